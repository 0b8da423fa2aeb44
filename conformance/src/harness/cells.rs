//! The cell operations a scenario calls through [`Ctx`] (create, wait, exec, destroy), each
//! recorded for the residue check and the failure message.

use super::*;

impl Ctx {
    /// `backend.create`, recorded (in the ledger too, before the backend is called).
    pub async fn try_create(&self, doc: &CellDocument) -> Result<CellHandle, CellError> {
        let id = doc.spec.id.clone();
        self.ensure_registered(&id, doc);
        self.set_cell(&id);
        self.ledger_write(&id);
        let r = self.inner.backend.create(doc).await;
        self.progressed();
        if let Ok(h) = &r {
            self.mark_live(h);
            if h.host_pid.is_some() {
                self.ledger_write(&id);
            }
        }
        r
    }

    /// The scenario destroyed `id` (or saw its create refused) and checked itself that it left
    /// nothing: forget its records and remove its ledger entry, as the end of a trial does for
    /// every clean cell. For scenarios that create cells one after another by the thousand (the
    /// property test): the records, and the end-of-trial audit over them, then stay the size of
    /// one case instead of growing with the case count. A record still live is kept (the harness
    /// destroys and checks it afterwards).
    ///
    /// What a released cell leaves later is still found: at the end of the trial, and when the
    /// audit window closes, anything that mentions this trial's token in an id (`cc-<token>-`) or a
    /// marker (`ccm-<token>-`) is residue of the trial ([`Ctx::released_needles`]).
    pub fn release_clean(&self, id: &str) {
        let mut entries = Vec::new();
        {
            let mut st = self.st();
            st.cells.retain(|c| {
                let drop = c.id == id && !c.live;
                if drop {
                    entries.extend(c.ledger.clone());
                }
                !drop
            });
            st.released = true;
        }
        for p in entries {
            let _ = std::fs::remove_file(p);
        }
    }

    /// `backend.create`, which must succeed.
    pub async fn create(&self, doc: &CellDocument) -> Result<CellHandle, Failure> {
        self.try_create(doc)
            .await
            .map_err(|e| self.fail(format!("create failed: {e} ({e:?})")))
    }

    /// Create, then wait until the workload runs its program: a holding probe until it says it is
    /// ready (so its fds and env are only what the backend handed over), anything else until
    /// `/proc/<pid>/cmdline` is its argv; without a host pid, a short settle delay.
    pub async fn create_running(&self, doc: &CellDocument) -> Result<CellHandle, Failure> {
        let h = self.create(doc).await?;
        self.await_running(&h, &doc.spec.run.argv).await?;
        Ok(h)
    }

    pub async fn await_running(&self, h: &CellHandle, argv: &[String]) -> Result<(), Failure> {
        use cellcheck_fixtures::ProbeState;
        let Some(pid) = h.host_pid else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(());
        };
        let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
        let probe = cellcheck_fixtures::ready::announces_readiness(argv);
        let start = Instant::now();
        loop {
            let state = cellcheck_fixtures::probe_state(std::path::Path::new("/proc"), pid);
            let seen = match state {
                ProbeState::Ready if probe => return Ok(()),
                // A process that ended cannot start later: say so now rather than after 15 s.
                ProbeState::Exited | ProbeState::Gone => {
                    return Err(self.fail(format!(
                        "host pid {pid} {} before it started {argv:?}",
                        if state == ProbeState::Gone {
                            "does not exist"
                        } else {
                            "exited"
                        }
                    )))
                }
                ProbeState::Ready => {
                    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
                }
                ProbeState::Starting { cmdline, .. } => cmdline,
            };
            if !probe && seen == want {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(15) {
                let what = if probe { "get ready running" } else { "start" };
                return Err(self.fail(format!(
                    "host pid {pid} did not {what} {argv:?} within 15 s (cmdline {:?})",
                    String::from_utf8_lossy(&seen)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn record_output(&self, what: String, r: &ExitReport) {
        self.st().outputs.push((what, r.clone()));
    }

    /// `backend.wait`, recorded.
    pub async fn try_wait(&self, id: &str) -> Result<ExitReport, CellError> {
        self.set_cell(id);
        let r = self.inner.backend.wait(id).await;
        self.progressed();
        if let Ok(rep) = &r {
            self.record_output(format!("wait {id}"), rep);
        }
        r
    }

    pub async fn wait(&self, id: &str) -> Result<ExitReport, Failure> {
        self.try_wait(id)
            .await
            .map_err(|e| self.fail(format!("wait failed: {e} ({e:?})")))
    }

    /// `backend.destroy`, recorded.
    pub async fn try_destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        self.set_cell(id);
        let r = self.inner.backend.destroy(id).await;
        self.progressed();
        if r.is_ok() {
            self.mark_gone(id);
            self.check_gone(id);
        }
        r
    }

    pub async fn destroy(&self, id: &str) -> Result<TeardownReport, Failure> {
        self.try_destroy(id)
            .await
            .map_err(|e| self.fail(format!("destroy failed: {e} ({e:?})")))
    }

    /// Run the probe with `args` in the live cell `id`, with the cell's marker as its only env.
    pub async fn try_exec(&self, id: &str, args: &[&str]) -> Result<ExitReport, CellError> {
        self.set_cell(id);
        let req = ExecRequest {
            argv: Self::probe_argv(args),
            env: vec![self.marker_env(id)],
            timeout_ms: Some(30_000),
        };
        let r = self.inner.backend.exec(id, req).await;
        self.progressed();
        if let Ok(rep) = &r {
            self.record_output(format!("exec {id} {args:?}"), rep);
        }
        r
    }

    pub async fn exec(&self, id: &str, args: &[&str]) -> Result<ExitReport, Failure> {
        self.try_exec(id, args)
            .await
            .map_err(|e| self.fail(format!("exec {args:?} failed: {e} ({e:?})")))
    }

    /// Create a cell running the probe with `args`, wait for it, return its id and report.
    pub async fn run_probe(&self, args: &[&str]) -> Result<(String, ExitReport), Failure> {
        let doc = self.doc(args);
        self.run_doc(&doc).await
    }

    pub async fn run_doc(&self, doc: &CellDocument) -> Result<(String, ExitReport), Failure> {
        let h = self.create(doc).await?;
        let r = self.wait(&h.id).await?;
        Ok((h.id, r))
    }

    /// Create, wait and destroy; the report of the run.
    pub async fn run_and_destroy(&self, args: &[&str]) -> Result<ExitReport, Failure> {
        let (id, r) = self.run_probe(args).await?;
        self.destroy(&id).await?;
        Ok(r)
    }
}
