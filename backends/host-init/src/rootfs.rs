//! Assembling the cell's root: mounts, binds, mount points and the masked, partly read-only
//! `/proc`.

use super::*;

pub(super) fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Failure> {
    let src_c = src.map(cstr);
    let fs_c = fstype.map(cstr);
    let data_c = data.map(cstr);
    let t = cstr(target.as_os_str());
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            t.as_ptr(),
            fs_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(fail(
            "setup",
            format!(
                "mount {} on {} ({})",
                src.unwrap_or("-"),
                target.display(),
                fstype.unwrap_or("bind/remount")
            ),
        ));
    }
    Ok(())
}

pub(super) fn bind(src: &Path, target: &Path, readonly: bool) -> Result<(), Failure> {
    let s = src.to_string_lossy();
    mount(Some(&s), target, None, libc::MS_BIND | libc::MS_REC, None)?;
    if readonly {
        mount(
            None,
            target,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

/// Make `target` exist as the same kind of node as `source` (directory or file). Works where the
/// parent is writable (our tmpfs mounts); elsewhere the error names the path.
pub(super) fn ensure_mount_point(source: &Path, target: &Path) -> Result<(), Failure> {
    if target.exists() {
        return Ok(());
    }
    let is_dir = std::fs::metadata(source)
        .map(|m| m.is_dir())
        .unwrap_or(true);
    let res = if is_dir {
        std::fs::create_dir_all(target)
    } else {
        target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::File::create(target).map(drop))
    };
    res.map_err(|e| {
        (
            "setup",
            e.raw_os_error().unwrap_or(0),
            format!(
                "bind target {} does not exist in the cell's root and cannot be created: {e}",
                target.display()
            ),
        )
    })
}

/// `/proc` entries that leak host facts or drive the kernel: files read as /dev/null,
/// directories as an empty read-only tmpfs.
pub(super) const MASKED: &[&str] = &[
    "kcore",
    "keys",
    "kmsg",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "latency_stats",
    "acpi",
    "asound",
    "scsi",
];

/// `/proc` trees that stay visible but read-only: kernel tunables and the sysrq trigger.
pub(super) const READONLY: &[&str] = &["sys", "bus", "fs", "irq", "sysrq-trigger"];

pub(super) fn mask_proc(proc: &Path, nodev: libc::c_ulong) -> Result<(), Failure> {
    for name in MASKED {
        let p = proc.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => mount(
                Some("tmpfs"),
                &p,
                Some("tmpfs"),
                nodev | libc::MS_RDONLY,
                None,
            )?,
            Ok(_) => bind(Path::new("/dev/null"), &p, true)?,
            Err(_) => {}
        }
    }
    for name in READONLY {
        let p = proc.join(name);
        if p.exists() {
            mount(
                Some(&p.to_string_lossy()),
                &p,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )?;
            // A bind remount keeps proc's nosuid/nodev/noexec only if they are asked for again.
            mount(
                None,
                &p,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | nodev,
                None,
            )?;
        }
    }
    Ok(())
}

pub(super) fn build_root(cfg: &Config) -> Result<(), Failure> {
    let root = Path::new(&cfg.newroot);
    // Nothing we mount may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    bind(Path::new(&cfg.rootfs), root, true)?;
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some("proc"), &root.join("proc"), Some("proc"), nodev, None)?;
    mask_proc(&root.join("proc"), nodev)?;
    let dev = root.join("dev");
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = Path::new("/dev").join(name);
        let inner = dev.join(name);
        std::fs::File::create(&inner).map_err(|e| {
            (
                "setup",
                e.raw_os_error().unwrap_or(0),
                format!("create {}: {e}", inner.display()),
            )
        })?;
        bind(&host, &inner, false)?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, dev.join(link));
    }
    let _ = std::fs::create_dir(dev.join("shm"));
    mount(
        Some("tmpfs"),
        &root.join("tmp"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount(
        Some("tmpfs"),
        &root.join("run"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=755"),
    )?;
    // Read-only sysfs: in the cell's own netns it shows only `lo`; it also gives nested cells a
    // `/sys/fs/cgroup` mount point to bind the host's cgroups onto.
    mount(
        Some("sysfs"),
        &root.join("sys"),
        Some("sysfs"),
        nodev | libc::MS_RDONLY,
        None,
    )?;
    for b in &cfg.binds {
        let target = root.join(b.target.trim_start_matches('/'));
        ensure_mount_point(Path::new(&b.source), &target)?;
        bind(Path::new(&b.source), &target, b.readonly)?;
    }
    let root_c = cstr(root.as_os_str());
    let dot = cstr(".");
    // SAFETY: plain syscalls on valid paths. pivot_root(".", ".") stacks the old root on top of
    // the new one, so detaching "." afterwards drops the host's tree from this namespace.
    unsafe {
        if libc::chdir(root_c.as_ptr()) != 0 {
            return Err(fail("setup", "chdir new root"));
        }
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(fail("setup", "pivot_root"));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(fail("setup", "detach old root"));
        }
        let slash = cstr("/");
        if libc::chdir(slash.as_ptr()) != 0 {
            return Err(fail("setup", "chdir /"));
        }
    }
    Ok(())
}
