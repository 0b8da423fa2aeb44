//! The faults that rewrite what passes through: the document before the inner backend sees it,
//! admission's extra refusals and a report on its way back.

use std::collections::BTreeSet;

use cellcheck_contract::{CellDocument, CellError, ExitReport, Termination};

use super::{Fault, FaultyBackend, EXTRA_DEVICE};
use crate::ids::canary;

/// [`Fault::WritableRoot`]'s wrapper: an overlay of `/` whose upper layer is in the cell's tmpfs
/// `/tmp`, the cell's `/proc`, `/dev` and `/sys` bound into it, and the workload chrooted there.
const WRITABLE_ROOT: &str = "m=/tmp/.writable-root && mkdir -p $m/upper $m/work $m/root && \
    mount -t overlay overlay -o lowerdir=/,upperdir=$m/upper,workdir=$m/work $m/root && \
    for d in proc dev sys; do mount -o rbind /$d $m/root/$d || exit 1; done && \
    exec /bin/busybox chroot $m/root \"$@\"";

impl FaultyBackend {
    pub(super) fn wrap(&self, doc: &CellDocument) -> CellDocument {
        let mut d = doc.clone();
        match self.fault {
            Fault::LeakAmbientEnv => {
                let c = canary();
                let mut argv = vec!["/bin/env".to_string(), format!("{}={}", c.name, c.value)];
                argv.append(&mut d.spec.run.argv);
                d.spec.run.argv = argv;
            }
            Fault::LeakFd => {
                let mut argv = vec![
                    "/bin/sh".to_string(),
                    "-c".to_string(),
                    "exec 7</dev/null; exec \"$@\"".to_string(),
                    "sh".to_string(),
                ];
                argv.append(&mut d.spec.run.argv);
                d.spec.run.argv = argv;
            }
            Fault::AdmissionTooLax => {
                let run = &mut d.spec.run;
                let mut seen = BTreeSet::new();
                run.env.retain(|e| seen.insert(e.name.clone()));
                let over = match (d.spec.lifetime, run.timeout_ms) {
                    (Some(l), _) if l.ttl_seconds == 0 => true,
                    (Some(l), Some(t)) => t > l.ttl_seconds.saturating_mul(1000),
                    _ => false,
                };
                if over {
                    d.spec.lifetime = None;
                }
            }
            Fault::TimeoutOnlyWhileWaiting => d.spec.run.timeout_ms = None,
            Fault::IgnoreWorkingDirectory => d.spec.run.working_directory = None,
            Fault::MissingCwdStartsAtRoot if self.missing_cwd(doc).is_some() => {
                d.spec.run.working_directory = None
            }
            Fault::TtlDroppedWithTimeout if d.spec.run.timeout_ms.is_some() => {
                d.spec.lifetime = None
            }
            Fault::ExtraDevice => {
                let mut argv = vec![
                    "/bin/sh".to_string(),
                    "-c".to_string(),
                    format!("mknod /dev/{EXTRA_DEVICE} c 1 3 && exec \"$@\""),
                    "sh".to_string(),
                ];
                argv.append(&mut d.spec.run.argv);
                d.spec.run.argv = argv;
            }
            Fault::WritableRoot => {
                let mut argv = vec![
                    "/bin/sh".to_string(),
                    "-c".to_string(),
                    WRITABLE_ROOT.to_string(),
                    "sh".to_string(),
                ];
                argv.append(&mut d.spec.run.argv);
                d.spec.run.argv = argv;
            }
            Fault::DropOpenFiles => {
                if let Some(l) = d.spec.run.limits.as_mut() {
                    l.open_files = None;
                }
            }
            Fault::DropLimits => {
                if let Some(l) = d.spec.run.limits.as_mut() {
                    l.memory_max_bytes = None;
                    l.pids_max = None;
                    l.cpu_max = None;
                }
            }
            _ => {}
        }
        d
    }

    /// [`Fault::AdmissionTooStrict`]'s extra refusals.
    pub(super) fn too_strict(doc: &CellDocument) -> Result<(), CellError> {
        if doc.spec.id.len() > 64 {
            return Err(CellError::invalid("spec.id", "longer than 64 characters"));
        }
        if let Some(i) = doc.spec.run.argv.iter().position(|a| !a.is_ascii()) {
            return Err(CellError::invalid(
                format!("spec.run.argv[{i}]"),
                "not ASCII",
            ));
        }
        if let Some(i) = doc.spec.run.env.iter().position(|e| !e.value.is_ascii()) {
            return Err(CellError::invalid(
                format!("spec.run.env[{i}].value"),
                "not ASCII",
            ));
        }
        Ok(())
    }

    pub(super) fn fold(&self, r: &mut ExitReport) {
        match (self.fault, r.termination) {
            (Fault::FoldExitAsSignal, Termination::Exited { code })
                if (129..=192).contains(&code) =>
            {
                r.termination = Termination::Signaled { signal: code - 128 }
            }
            (Fault::FoldSignalAsExit, Termination::Signaled { signal }) => {
                r.termination = Termination::Exited { code: 128 + signal }
            }
            (Fault::MangleOutput, _) => {
                r.stdout = String::from_utf8_lossy(&r.stdout).into_owned().into_bytes();
                r.stderr = String::from_utf8_lossy(&r.stderr).into_owned().into_bytes();
            }
            (Fault::MergeStreams, _) => {
                let err = std::mem::take(&mut r.stderr);
                r.stdout.extend(err);
            }
            _ => {}
        }
    }
}
