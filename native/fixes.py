"""What to paste to give this host what a probe row or a skip reason says it lacks.

Each fix is one command (Debian and Ubuntu: sudo, sysctl, udev, apt-get) and the reason for it, written
``why: `command```; where there is more than one way, each is a fix of its own, joined by "; or ". The
host probe (native.host) puts them in its rows' hints, the native layer (native.errors) in the skip
reasons it raises, and conftest.py in what it says when --reserve-hugepages or --thp cannot act.
Pure Python, importable on every platform.
"""

from __future__ import annotations

import os
import sys

# The group Debian's and Ubuntu's udev rules give /dev/kvm; the one snapproof's fixes give /dev/userfaultfd too.
KVM_GROUP = "kvm"
UDEV_RULES = "/etc/udev/rules.d"
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def fix(why: str, command: str) -> str:
    """One way out: ``why: `command```."""
    return f"{why}: `{command}`"


def either(*fixes: str) -> str:
    return "; or ".join(f for f in fixes if f)


def user() -> str:
    """This process's user name (its uid where the name is unknown)."""
    if sys.platform == "win32":
        return os.environ.get("USERNAME", "you")
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def node_group(path: str) -> str | None:
    """The group name of a device node (None where it does not exist or has no name)."""
    if sys.platform == "win32":
        return None
    import grp

    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return None


def membership(group: str) -> tuple[bool, bool]:
    """(listed as a member in the group database, in this process's groups): a user added to a group but not
    logged in again since is the first without the second."""
    if sys.platform == "win32":
        return False, False
    import grp

    try:
        g = grp.getgrnam(group)
    except KeyError:
        return False, False
    me = user()
    import pwd

    try:
        primary = pwd.getpwnam(me).pw_gid == g.gr_gid
    except KeyError:
        primary = False
    return me in g.gr_mem or primary, g.gr_gid in os.getgroups() or os.getegid() == g.gr_gid


def join_group(group: str, what: str) -> str:
    """The fix for a node whose group this user is not in (yet, or not in this login)."""
    listed, active = membership(group)
    if listed and not active:
        return fix(f"you are in group {group}, but not in this login: log in again, or for this shell",
                   f"newgrp {group}")
    return fix(f"{what} belongs to group {group}: join it, then log in again", f"sudo usermod -aG {group} {user()}")


def udev_rule(kernel: str, group: str) -> str:
    """A node to a group, mode 0660, now and at every boot (udev's rule, and chgrp/chmod for the node as it is)."""
    node, rules = f"/dev/{kernel}", f"{UDEV_RULES}/60-snapproof-{kernel}.rules"
    return (f"sudo mkdir -p {UDEV_RULES} && echo 'KERNEL==\"{kernel}\", GROUP=\"{group}\", MODE=\"0660\"' | "
            f"sudo tee {rules} && sudo chgrp {group} {node} && sudo chmod 0660 {node}")


def kvm_access() -> str:
    """How to get read and write access to /dev/kvm."""
    group = node_group("/dev/kvm")
    if group and group != "root":
        return join_group(group, "/dev/kvm")
    return either(fix(f"/dev/kvm is root's alone: give it to group {KVM_GROUP} (Debian's and Ubuntu's udev rules "
                      "do), then join that group and log in again",
                      f"sudo groupadd -f {KVM_GROUP} && {udev_rule('kvm', KVM_GROUP)} && "
                      f"sudo usermod -aG {KVM_GROUP} {user()}"),
                  "run as root")


def kvm_module() -> str:
    """How to get a /dev/kvm at all: the module for this CPU's vendor."""
    vendor = ""
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        pass
    module = {"GenuineIntel": "kvm_intel", "AuthenticAMD": "kvm_amd"}.get(vendor, "kvm_intel  # or kvm_amd")
    return fix("load KVM for this CPU (virtualization on in the firmware; in a VM, nested virtualization on in the "
               "host below)", f"sudo modprobe {module}")


def uffd_access() -> str:
    """How to get userfaultfd with kernel-mode faults (KVM touches guest memory from the kernel) without root."""
    group = node_group("/dev/kvm")
    group = group if group and group != "root" else KVM_GROUP
    fixes = []
    if os.path.exists("/dev/userfaultfd"):  # kernel 6.1+
        listed, _ = membership(group)
        whose = "yours" if listed else "join it as row kvm says"
        fixes.append(fix(f"give /dev/userfaultfd to group {group} ({whose}), as /dev/kvm is: its userfaultfds "
                         "handle kernel-mode faults whatever the sysctl says", udev_rule("userfaultfd", group)))
    fixes.append(fix("let every user's userfaultfd handle kernel-mode faults (wider)",
                     "sudo sysctl -w vm.unprivileged_userfaultfd=1"))
    return either(*fixes)


def hugepages(want_free: int, free: int, total: int) -> str:
    """How to have ``want_free`` hugepages free (the pool's other pages are in use: keep them)."""
    target = total - free + want_free
    return either(fix(f"reserve {want_free} free hugepages (until reboot)", f"sudo sysctl -w vm.nr_hugepages={target}"),
                  f"as root, for the run only: `--reserve-hugepages {want_free}`")


def thp_knobs(settings: list[tuple[str, str]]) -> str:
    """How to set /sys/kernel/mm/transparent_hugepage knobs, (path, value) each, until reboot: one tee a value."""
    by_value: dict[str, list[str]] = {}
    for path, value in settings:
        by_value.setdefault(value, []).append(path)
    command = " && ".join(f"echo {value} | sudo tee {' '.join(paths)} >/dev/null" for value, paths in by_value.items())
    what = "set the knob" if len(settings) == 1 else "set the knobs"
    return either(fix(f"{what} (for MADV_HUGEPAGE mappings, until reboot)", command),
                  "as root, for the run only: `--thp`")


def apt_install(*packages: str, why: str) -> str:
    return fix(why, f"sudo apt-get install {' '.join(packages)}")
