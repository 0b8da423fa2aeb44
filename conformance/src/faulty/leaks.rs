//! What the leaking faults make and how it is removed again: the processes, cgroup dirs, state
//! files, mounts and netns a fault leaves, each recorded so cleanup goes by pid or path.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use cellcheck_contract::{CellDocument, CellError};

use super::{Fault, FaultyBackend};

/// Something an undeclared fault made, to be removed by [`FaultyBackend::cleanup`].
#[derive(Debug)]
pub(super) enum Made {
    Path(PathBuf),
    Mount(PathBuf),
    Netns(String),
}

impl FaultyBackend {
    /// The extra cgroup dir [`Fault::SkipCgroupRemoval`] makes for `id`.
    pub fn cgroup_dir(id: &str) -> PathBuf {
        let root = PathBuf::from("/sys/fs/cgroup");
        // v2 (unified at the root) or the v1 pids controller.
        let base = if root.join("cgroup.controllers").exists() {
            root
        } else {
            root.join("pids")
        };
        base.join(format!("cellcheck-faulty-{id}"))
    }

    /// The state file [`Fault::LeaveStateFile`] writes for `id`.
    pub fn state_file(id: &str) -> PathBuf {
        std::env::temp_dir().join(format!("cellcheck-faulty-{id}.state"))
    }

    /// What the undeclared faults made, by name (for the self-tests' expected messages).
    pub fn made(&self) -> Vec<String> {
        self.made
            .lock()
            .unwrap()
            .iter()
            .map(|m| match m {
                Made::Path(p) | Made::Mount(p) => p.display().to_string(),
                Made::Netns(n) => n.clone(),
            })
            .collect()
    }

    /// Remove what the faults leaked: kill and reap the leaked processes (by their recorded pid),
    /// remove the cgroup dirs and state files of the given ids. Returns what it removed.
    pub fn cleanup(&self, ids: &[String]) -> Vec<String> {
        let mut done = Vec::new();
        // The late destroys first: they kill what is still running.
        let late: Vec<_> = self.late.lock().unwrap().drain(..).collect();
        for h in late {
            while !h.is_finished() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            done.push("a late destroy".to_string());
        }
        for m in self.made.lock().unwrap().drain(..).rev() {
            let ok = match &m {
                Made::Mount(p) => {
                    nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).is_ok()
                        && std::fs::remove_dir(p).is_ok()
                }
                Made::Path(p) if p.is_dir() => std::fs::remove_dir(p).is_ok(),
                Made::Path(p) => std::fs::remove_file(p).is_ok(),
                Made::Netns(n) => Command::new("ip")
                    .args(["netns", "delete", n])
                    .status()
                    .is_ok_and(|s| s.success()),
            };
            if ok {
                done.push(format!("{m:?}"));
            }
        }
        for mut c in self.leaked.lock().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
            done.push(format!("pid {}", c.id()));
        }
        for id in ids {
            let d = Self::cgroup_dir(id);
            if std::fs::remove_dir(&d).is_ok() {
                done.push(d.display().to_string());
            }
            let f = Self::state_file(id);
            if std::fs::remove_file(&f).is_ok() {
                done.push(f.display().to_string());
            }
        }
        done
    }

    /// [`FaultyBackend::cleanup`] for every id this backend created.
    pub fn cleanup_created(&self) -> Vec<String> {
        let ids: Vec<String> = self.created.lock().unwrap().clone();
        self.cleanup(&ids)
    }

    pub(super) fn spawn_quiet(&self, cmd: &mut Command) -> Result<Child, CellError> {
        cmd.env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| CellError::failure(format!("faulty: spawn helper: {e}")))
    }

    /// The undeclared leaks of create, each named after the cell (as a backend names its things).
    pub(super) fn leak_undeclared(&self, doc: &CellDocument) -> Result<(), CellError> {
        let id = &doc.spec.id;
        let tmp = std::env::temp_dir();
        let mut made = self.made.lock().unwrap();
        match self.fault {
            Fault::UndeclaredCgroupDir => {
                let d = Self::cgroup_dir(id).with_file_name(format!("cellcheck-undeclared-{id}"));
                std::fs::create_dir_all(&d)?;
                made.push(Made::Path(d));
            }
            Fault::UndeclaredFile => {
                let f = tmp.join(format!("cellcheck-undeclared-{id}"));
                std::fs::write(&f, b"x")?;
                made.push(Made::Path(f));
            }
            Fault::UndeclaredMount => {
                let d = tmp.join(format!("cellcheck-mnt-{id}"));
                std::fs::create_dir_all(&d)?;
                made.push(Made::Path(d.clone()));
                nix::mount::mount(
                    Some("cellcheck-faulty"),
                    &d,
                    Some("tmpfs"),
                    nix::mount::MsFlags::empty(),
                    Some("size=64k"),
                )
                .map_err(|e| CellError::failure(format!("faulty: mount: {e}")))?;
                made.pop();
                made.push(Made::Mount(d));
            }
            Fault::UndeclaredNetns => {
                let n = format!("cellcheck-{id}");
                let ok = Command::new("ip")
                    .args(["netns", "add", &n])
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    return Err(CellError::failure("faulty: `ip netns add` failed"));
                }
                made.push(Made::Netns(n));
            }
            Fault::UnmarkedHelper => {
                let c = self.spawn_quiet(Command::new("sleep").arg("3600"))?;
                self.leaked.lock().unwrap().push(c);
            }
            Fault::Zombie => {
                let c = self.spawn_quiet(&mut Command::new("true"))?;
                self.leaked.lock().unwrap().push(c);
            }
            Fault::SecretToFile => {
                let secrets = crate::ids::declared_secrets(doc);
                if !secrets.is_empty() {
                    let f = tmp.join(format!("faulty-{}.log", crate::ids::random_token(10)));
                    std::fs::write(&f, secrets.join("\n"))?;
                    made.push(Made::Path(f));
                }
            }
            Fault::WriteSharedRootfs => {
                if let Some(root) = crate::roots::given(&self.name) {
                    let f = root.join(format!("faulty-{id}"));
                    std::fs::write(&f, b"x")?;
                    made.push(Made::Path(f));
                }
            }
            Fault::CreateMissingCwd => {
                if let Some(root) = crate::roots::given(&self.name) {
                    let d = root.join("work");
                    match std::fs::create_dir(&d) {
                        Ok(()) => made.push(Made::Path(d)),
                        // A second cell of the trial finds it made already.
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl FaultyBackend {
    /// Where the declared working directory would be in the rootfs the backend was given, when
    /// that rootfs lacks it.
    pub(super) fn missing_cwd(&self, doc: &CellDocument) -> Option<PathBuf> {
        let wd = doc.spec.run.working_directory.as_deref()?;
        let p = crate::roots::given(&self.name)?.join(wd.trim_start_matches('/'));
        (!p.is_dir()).then_some(p)
    }

    /// [`Fault::MakeMissingCwd`]: make the missing working directory in the root before create.
    pub(super) fn make_missing_cwd(&self, doc: &CellDocument) -> std::io::Result<()> {
        if let Some(p) = self.missing_cwd(doc) {
            std::fs::create_dir_all(&p)?;
            self.made.lock().unwrap().push(Made::Path(p));
        }
        Ok(())
    }
}
