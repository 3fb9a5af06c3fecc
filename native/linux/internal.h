/* Helpers shared by the Linux C files; not part of the cffi contract. */
#ifndef SNAPPROOF_INTERNAL_H
#define SNAPPROOF_INTERNAL_H
#include "snapproof.h"

/* Record `op` as this thread's failing operation and return -errno. */
int sp_fail(const char *op);
void sp_set_last_op(const char *op);
#endif
