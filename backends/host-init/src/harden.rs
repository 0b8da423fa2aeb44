//! What the workload (and every exec'd command) gives up right before exec: its capabilities
//! (all five sets), new privileges (no_new_privs) and the dangerous syscalls (a seccomp filter).
//!
//! The filters are built with `seccompiler` before fork; the child only runs syscalls.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use cellcheck_host_init::deny::{denied, NAMESPACE_CLONE_FLAGS};

fn arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e}"))
}

/// The filters to install, in order. clone3 passes its flags in memory a filter cannot read, so
/// it answers ENOSYS (libc then falls back to clone, which the first filter checks); of two
/// errno answers the later filter's wins, so that one comes second.
pub fn filters() -> Result<Vec<BpfProgram>, String> {
    let arch = arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied().map(|(_, nr)| (nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_CLONE_FLAGS
        .iter()
        .map(|&flag| {
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("seccomp: clone rule: {e}"))?;
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    [deny, clone3]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(|e| format!("seccomp: {e}")))
        .collect()
}

/// In the forked child, right before exec: no_new_privs, no capability in any set, then the
/// filters. Returns the errno of the step that failed. Only syscalls: safe after fork.
///
/// # Safety
/// Call only in a single-threaded child that is about to exec.
pub unsafe fn drop_privileges(filters: &[BpfProgram]) -> Result<(), i32> {
    let err = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    };
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        return Err(err());
    }
    // The bounding set first (that needs CAP_SETPCAP, still held); EINVAL past the last cap.
    for cap in 0..64 {
        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && err() != libc::EINVAL {
            return Err(err());
        }
    }
    if libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL,
        0,
        0,
        0,
    ) != 0
        && err() != libc::EINVAL
    {
        return Err(err());
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [0u32; 6]; // effective, permitted, inheritable (x2): all empty
    if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
        return Err(err());
    }
    for f in filters {
        if let Err(e) = seccompiler::apply_filter(f) {
            return Err(match e {
                seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => {
                    io.raw_os_error().unwrap_or(libc::EINVAL)
                }
                _ => libc::EINVAL,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_compile_for_this_arch() {
        let f = super::filters().unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|p| !p.is_empty()));
    }
}
