//! The VMM process at its boundary on the host: a cgroup of its own carrying memory and pids
//! limits, mount/net/ipc/uts namespaces of its own, no capability in any set and no_new_privs.
//! QEMU's own seccomp sandbox is one of its arguments ([`SANDBOX`]).
//!
//! - **Memory**: the guest's RAM plus [`VMM_OVERHEAD_MIB`] for QEMU itself (its code, the TCG
//!   translation cache it is given with `tb-size`, device state, I/O buffers): the VMM's whole
//!   footprint, so a runaway VMM is stopped at the cell's share.
//! - **Pids**: [`VMM_PIDS_MAX`] tasks. QEMU's threads (main loop, vCPU, RCU, the I/O worker
//!   pool, migration) count here; the workload's processes live in the guest and are held by the
//!   guest's own pids limit.
//! - The cgroup is `cellcheck-qemu/<instance>-<id>` under each hierarchy used (v2: the unified
//!   root; v1: `memory` and `pids`), removed on destroy once QEMU is reaped.
//! - No pid namespace: unsharing one in `pre_exec` would only apply to QEMU's children (it has
//!   none: `spawn=deny`), and QEMU itself would need a launcher to become pid 1 of its own.
//!
//! TCG needs no capability; KVM needs only `/dev/kvm`'s file permission (QEMU runs as root,
//! the owner), so every set is emptied before exec.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// QEMU's seccomp sandbox: obsolete syscalls, privilege changes, spawning processes and
/// resource control all refused.
pub(crate) const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// What QEMU needs on top of the guest's RAM (MiB).
pub(crate) const VMM_OVERHEAD_MIB: u64 = 256;

/// The TCG translation cache QEMU is given (MiB): bounded, so it fits the overhead above.
pub(crate) const TCG_TB_MIB: u64 = 64;

/// Tasks the VMM may have (its threads).
pub(crate) const VMM_PIDS_MAX: u64 = 64;

/// Where the cgroup hierarchies are mounted.
pub(crate) const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The shared parent of every VMM cgroup, under each hierarchy.
const PARENT: &str = "cellcheck-qemu";

/// A VMM's cgroup: one leaf per hierarchy used, each joined before exec.
#[derive(Debug)]
pub(crate) struct VmmCgroup {
    leaves: Vec<PathBuf>,
}

/// The leaf dirs [`VmmCgroup::create`] makes for `leaf` on this host (for the footprint).
pub(crate) fn dirs_for(leaf: &str) -> Vec<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        vec![root.join(PARENT).join(leaf)]
    } else {
        ["memory", "pids"]
            .iter()
            .map(|h| root.join(h).join(PARENT).join(leaf))
            .collect()
    }
}

impl VmmCgroup {
    /// Make the leaves under `root` (`/sys/fs/cgroup`) and write the limits.
    pub fn create(root: &Path, leaf: &str, memory_mib: u64) -> io::Result<VmmCgroup> {
        let bytes = (memory_mib + VMM_OVERHEAD_MIB) << 20;
        let mut cg = VmmCgroup { leaves: Vec::new() };
        let made = if root.join("cgroup.controllers").exists() {
            cg.make(root, leaf, true).and_then(|d| {
                write(&d.join("memory.max"), &bytes.to_string())?;
                write(&d.join("pids.max"), &VMM_PIDS_MAX.to_string())
            })
        } else {
            cg.make(&root.join("memory"), leaf, false)
                .and_then(|d| write(&d.join("memory.limit_in_bytes"), &bytes.to_string()))
                .and_then(|_| cg.make(&root.join("pids"), leaf, false))
                .and_then(|d| write(&d.join("pids.max"), &VMM_PIDS_MAX.to_string()))
        };
        match made {
            Ok(()) => Ok(cg),
            Err(e) => {
                cg.remove();
                Err(e)
            }
        }
    }

    /// `hierarchy/PARENT/leaf`, recorded for removal. The shared parent may vanish between the
    /// two mkdirs (another process removed it when it emptied): walk again then.
    fn make(&mut self, hierarchy: &Path, leaf: &str, v2: bool) -> io::Result<PathBuf> {
        let parent = hierarchy.join(PARENT);
        let dir = parent.join(leaf);
        let mut tries = 0;
        loop {
            std::fs::create_dir_all(&parent)?;
            if v2 {
                // Controllers must be enabled at every level above the leaf.
                write(&hierarchy.join("cgroup.subtree_control"), "+memory +pids")?;
                write(&parent.join("cgroup.subtree_control"), "+memory +pids")?;
            }
            match std::fs::create_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 8 => tries += 1,
                Err(e) => return Err(e),
            }
        }
        self.leaves.push(dir.clone());
        Ok(dir)
    }

    /// The `cgroup.procs` files QEMU writes itself into between fork and exec.
    pub fn procs_files(&self) -> Vec<CString> {
        self.leaves
            .iter()
            .filter_map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).ok())
            .collect()
    }

    /// Remove the leaves (their processes must be gone), then the shared parent if empty.
    pub fn remove(&self) {
        for d in &self.leaves {
            let _ = std::fs::remove_dir(d);
            if let Some(p) = d.parent() {
                // Busy while another VMM lives there: that one removes it later.
                let _ = std::fs::remove_dir(p);
            }
        }
    }
}

fn write(p: &Path, v: &str) -> io::Result<()> {
    std::fs::write(p, v).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Between fork and exec: join the cgroup, enter new mount/net/ipc/uts namespaces (mounts made
/// private, so nothing propagates back), set no_new_privs and empty every capability set.
///
/// # Safety
/// Only async-signal-safe calls: for a `pre_exec` hook.
pub(crate) unsafe fn enter(procs: &[CString]) -> io::Result<()> {
    let err = io::Error::last_os_error;
    for p in procs {
        let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(err());
        }
        // "0": the writing process itself.
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        if n != 1 {
            return Err(err());
        }
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if libc::unshare(flags) != 0 {
        return Err(err());
    }
    let root = b"/\0";
    if libc::mount(
        std::ptr::null(),
        root.as_ptr().cast(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        return Err(err());
    }
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        return Err(err());
    }
    if libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL,
        0,
        0,
        0,
    ) != 0
    {
        return Err(err());
    }
    // Every capability the kernel knows; EINVAL past the last one.
    for cap in 0..64 {
        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
            && *libc::__errno_location() != libc::EINVAL
        {
            return Err(err());
        }
    }
    let mut h = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let d = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    if libc::syscall(libc::SYS_capset, &mut h as *mut CapHeader, d.as_ptr()) != 0 {
        return Err(err());
    }
    Ok(())
}
