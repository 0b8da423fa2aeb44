//! The default seccomp policy, one list for every backend: the host backend's init builds its
//! filter from the numbers, the OCI bundle writes the names into its profile.

/// `(name, number)` from `libc::SYS_<name>`, so a name and its number can never disagree.
macro_rules! syscalls {
    ($($(#[$m:meta])* $nr:ident),* $(,)?) => {
        &[$($(#[$m])* (stringify!($nr), libc::$nr)),*]
    };
}

/// Refused outright with EPERM: mounting and namespaces, keys, kernel images and modules, bpf,
/// perf, userfaultfd, swap, reboot, the kernel log, tracing other processes, the clock, and
/// handle-based opens that walk around a chroot.
const DENIED_SYS: &[(&str, i64)] = syscalls![
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_unshare,
    SYS_setns,
    SYS_keyctl,
    SYS_add_key,
    SYS_request_key,
    SYS_kexec_load,
    SYS_kexec_file_load,
    SYS_init_module,
    SYS_finit_module,
    SYS_delete_module,
    SYS_open_by_handle_at,
    SYS_name_to_handle_at,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_userfaultfd,
    SYS_swapon,
    SYS_swapoff,
    SYS_reboot,
    SYS_syslog,
    SYS_ptrace,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_kcmp,
    SYS_acct,
    SYS_settimeofday,
    SYS_clock_settime,
    SYS_clock_adjtime,
    SYS_adjtimex,
    SYS_quotactl,
    SYS_lookup_dcookie,
    SYS_vhangup,
    SYS_fanotify_init,
    SYS_fsopen,
    SYS_fsconfig,
    SYS_fsmount,
    SYS_fspick,
    SYS_move_mount,
    SYS_open_tree,
    #[cfg(target_arch = "x86_64")]
    SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    SYS_uselib,
];

/// The refused syscalls as `(name, number)`, the name as libseccomp and the kernel spell it.
pub fn denied() -> impl Iterator<Item = (&'static str, i64)> {
    DENIED_SYS
        .iter()
        .map(|&(n, nr)| (n.strip_prefix("SYS_").unwrap_or(n), nr))
}

/// clone flags that make a new namespace (NEWNS, NEWUSER, NEWPID, NEWNET, NEWUTS, NEWIPC,
/// NEWCGROUP, NEWTIME): clone with any of them is refused, fork and threads stay allowed. clone3
/// passes its flags in memory a filter cannot read, so it answers ENOSYS (libc then falls back
/// to clone).
pub const NAMESPACE_CLONE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_and_unique() {
        let names: Vec<&str> = denied().map(|(n, _)| n).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert!(names.contains(&"mount") && names.contains(&"ptrace"));
        assert!(names.iter().all(|n| !n.starts_with("SYS_")));
        assert!(!NAMESPACE_CLONE_FLAGS.contains(&(libc::CLONE_THREAD as u64)));
    }
}
