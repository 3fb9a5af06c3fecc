#!/bin/busybox sh
# /init of the nested test host: a Debian kernel with the real kvm_amd module, the host's root filesystem
# shared read-only over 9p under a tmpfs overlay, so the same Python and the same native build run here.
# The job is /out/job.sh (written by nested/kvm_amd.py); its exit status goes to /out/rc.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

say() { echo "nested-init: $*" > /dev/console; }
die() { say "FAILED: $*"; echo 98 > /out/rc 2>/dev/null; sync; poweroff -f; reboot -f; }

arg() { sed -n "s/.*snapproof\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
NPT=$(arg npt)

# Dependency order; kvm-amd's own parameters come from the kernel command line.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         9pnet 9pnet_virtio netfs fscache 9p overlay irqbypass ccp kvm; do
  insmod /modules/$m.ko || die "insmod $m"
done
insmod /modules/kvm-amd.ko npt="${NPT:-1}" || die "insmod kvm-amd npt=${NPT:-1}"

mkdir -p /host /rw /merged /out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /out || die "mount the out share"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro hostroot /host || die "mount the host root"
mount -t tmpfs -o size=75% rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /merged || die "overlay"
for d in proc sys dev; do mount --bind /$d /merged/$d; done
mkdir -p /merged/dev/shm && mount -t tmpfs shm /merged/dev/shm
mkdir -p /merged/out && mount --bind /out /merged/out

hostname nested-kvm-amd
say "kernel $(uname -r), kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt), $(grep -c ^processor /proc/cpuinfo) CPUs"
chroot /merged /bin/sh /out/job.sh
echo $? > /out/rc
sync
umount /merged/out /out 2>/dev/null
poweroff -f
reboot -f
