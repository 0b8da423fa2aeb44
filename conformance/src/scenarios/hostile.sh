# A hostile workload: each attempt to reach past the cell prints one line
#   hostile <name> refused|succeeded <what it saw>
# and the suite (hostile.rs) judges them. Nothing here may harm a host where an attempt works:
# writes open without writing or put back what they found, mounts land on /tmp of the cell's own
# mount namespace and are undone, the hostname is set to the one it already has, a node and a
# file made are removed, and the process it may kill is the harness's own sleeping victim.
# Inputs: HOSTILE_DISK (MAJOR:MINOR of a host block device), HOSTILE_VICTIM (a host pid).

# Every tool through busybox itself: the rootfs links only some applets into /bin.
for a in cat chroot dmesg head hostname kill mknod mount rm touch tr umount unshare wc; do
    eval "$a() { /bin/busybox $a \"\$@\"; }"
done

say() {
    printf 'hostile %s %s %s\n' "$1" "$2" "$(printf '%s' "$3" | tr '\n' ' ' | head -c 200)"
}

try() {
    name=$1
    shift
    if out=$("$@" 2>&1); then say "$name" succeeded "$out"; else say "$name" refused "$out"; fi
}

mount_at_tmp() {
    mount "$@" /tmp || return 1
    umount /tmp
    return 0
}

mount_cgroup() {
    mount -t cgroup -o pids none /tmp || mount -t cgroup2 none /tmp || return 1
    cat /tmp/release_agent 2>/dev/null
    umount /tmp
    return 0
}

# mknod of a block device, anywhere it can be made; removed at once.
make_node() {
    for d in /dev /tmp /run /; do
        if mknod "$d/.hostile-node-$$" b "$1" "$2" 2>/dev/null; then
            rm -f "$d/.hostile-node-$$"
            echo "made in $d"
            return 0
        fi
    done
    mknod "/dev/.hostile-node-$$" b "$1" "$2"
    return 1
}

# The host's disk by its numbers, read through a node made for it.
read_disk() {
    for d in /dev /tmp /run /; do
        node="$d/.hostile-disk-$$"
        if mknod "$node" b "$1" "$2" 2>/dev/null; then
            n=$(head -c 512 "$node" 2>/dev/null | wc -c)
            rm -f "$node"
            if [ "$n" -gt 0 ]; then
                echo "read $n bytes through $node"
                return 0
            fi
            echo "a node was made in $d but reading it gave nothing"
            return 1
        fi
    done
    echo "no node could be made"
    return 1
}

# Open for writing (append, nothing written): opening is the escape.
open_write() {
    for f in "$@"; do
        if [ -e "$f" ]; then
            true >>"$f" || return 1
            echo "opened $f for writing"
            return 0
        fi
    done
    echo "none of $* exists"
    return 1
}

read_kcore() {
    n=$(head -c 16 /proc/kcore 2>/dev/null | wc -c)
    [ "$n" -gt 0 ] && echo "read $n bytes of /proc/kcore"
}

# Opening the kernel's log buffer is the leak (reading would take host messages from others).
open_kmsg() {
    [ -e /proc/kmsg ] || { echo "no /proc/kmsg"; return 1; }
    [ -c /proc/kmsg ] && { echo "/proc/kmsg is a device node (masked)"; return 1; }
    true </proc/kmsg && echo "opened /proc/kmsg"
}

read_dmesg() {
    n=$(dmesg 2>/dev/null | head -c 64 | wc -c)
    [ "$n" -gt 0 ] && echo "dmesg printed $n bytes"
}

write_root() {
    touch "/.hostile-$$" || return 1
    rm -f "/.hostile-$$"
    echo "created /.hostile-$$"
}

release_agent() {
    for f in /sys/fs/cgroup/release_agent /sys/fs/cgroup/*/release_agent; do
        if [ -r "$f" ] && cat "$f" >/dev/null 2>&1; then
            echo "read $f"
            return 0
        fi
    done
    echo "no readable release_agent"
    return 1
}

disk_major=${HOSTILE_DISK%%:*}
disk_minor=${HOSTILE_DISK##*:}

try mount_tmpfs mount_at_tmp -t tmpfs none
try mount_proc mount_at_tmp -t proc proc
try mount_cgroup mount_cgroup
try mknod_block make_node "$disk_major" "$disk_minor"
try read_host_disk read_disk "$disk_major" "$disk_minor"
try unshare_user unshare -U /bin/true
try unshare_mount unshare -m /bin/true
try write_proc_sys open_write /proc/sys/kernel/printk_ratelimit /proc/sys/kernel/hostname
try read_kcore read_kcore
try open_kmsg open_kmsg
try dmesg read_dmesg
try write_root write_root
try write_sys open_write /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/uevent_helper /sys/power/state
try release_agent release_agent
try sethostname hostname "$(hostname)"
try chroot chroot / /bin/true
try kill_host_process kill -9 "$HOSTILE_VICTIM"
echo "hostile done"
