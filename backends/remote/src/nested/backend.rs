//! The [`Backend`] face of [`NestedBackend`]: each call forwarded to the driver in the outer cell.

use tracing::Instrument;

use super::*;

#[async_trait]
impl Backend for NestedBackend {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.caps.clone()
    }

    fn attributes(&self) -> BTreeMap<String, String> {
        let mut a = self.outer().attributes();
        a.insert(
            "layers".into(),
            "host cell > cellcheck-driver host > host cell".into(),
        );
        a.insert("channel".into(), "unix socket in a bound directory".into());
        a
    }

    async fn preflight(&self) -> Availability {
        // The outer backend's own trial cell gets our binds too, so their sources must exist.
        if let Err(e) = make_dirs(&self.inner.root.join("sock")) {
            return Availability::Unavailable {
                reason: format!("create {}: {e}", self.inner.root.display()),
            };
        }
        let outer = self.outer().preflight().await;
        if let Availability::Unavailable { reason } = outer {
            return Availability::Unavailable {
                reason: format!("outer host backend: {reason}"),
            };
        }
        if !self.inner.driver.exists() {
            return Availability::Unavailable {
                reason: format!("static driver missing at {}", self.inner.driver.display()),
            };
        }
        let id = format!("preflight-{:08x}", rand::random::<u32>());
        let t0 = Instant::now();
        let res = match self.create(&CellDocument::new(&id, ["/bin/true"])).await {
            Ok(_) => {
                let r = self.wait(&id).await;
                let _ = self.destroy(&id).await;
                r
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(r) if r.code() == Some(0) => Availability::Available {
                evidence: format!(
                    "/bin/true in a host cell inside a host cell exited 0 in {} ms",
                    t0.elapsed().as_millis()
                ),
            },
            Ok(r) => Availability::Unavailable {
                reason: format!("nested /bin/true ended with {:?}", r.termination),
            },
            Err(e) => Availability::Unavailable {
                reason: format!("nested /bin/true: {e}"),
            },
        }
    }

    #[tracing::instrument(
        name = "nested",
        skip_all,
        err(level = "debug"),
        fields(op = "create", cell = %doc.spec.id)
    )]
    async fn create(&self, doc: &CellDocument) -> Result<CellHandle, CellError> {
        let cell = doc.admit()?;
        let id = cell.id().to_string();
        // Dropped on any error below (or a cancelled create): the id is free again.
        let reservation = self.inner.cells.reserve(&id)?;
        let outer_id = self.outer_id(&id);
        let res = async {
            let (conn, driver_pid) = self.open(&outer_id).await?;
            match client::create(&conn, &self.inner.opts.deadlines, doc).await {
                Ok(h) => Ok((conn, driver_pid, h)),
                Err(e) => {
                    conn.close(Duration::from_secs(10));
                    self.teardown_outer(&outer_id, Some(&id)).await;
                    Err(e)
                }
            }
        }
        .await;
        let (conn, driver_pid, h) = res?;
        let host_pid = match h.host_pid {
            Some(p) if driver_pid > 0 => host_pid_of(driver_pid, p),
            _ => None,
        };
        let nc = Arc::new(NestedCell {
            id: id.clone(),
            outer_id,
            driver_pid,
            conn,
            timeout_ms: cell.timeout_ms(),
            ttl: Mutex::new(None),
        });
        if let Some(ttl) = cell.ttl_seconds() {
            let incarnation = reservation.incarnation();
            let id2 = id.clone();
            let t = self.inner.cells.reap_after(
                &self.inner,
                &id,
                incarnation,
                Duration::from_secs(ttl),
                move |inner: Arc<Inner>, _| {
                    let span = tracing::info_span!(parent: None, "nested", op = "ttl", cell = %id2);
                    async move {
                        let b = NestedBackend { inner };
                        let _ = b.destroy_incarnation(&id2, Some(incarnation)).await;
                    }
                    .instrument(span)
                },
            );
            *lock(&nc.ttl) = Some(t);
        }
        reservation.commit(nc);
        Ok(CellHandle { id, host_pid })
    }

    #[tracing::instrument(
        name = "nested",
        skip_all,
        err(level = "debug"),
        fields(op = "wait", cell = %id)
    )]
    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        let c = self.live(id)?;
        let deadline = self.inner.opts.deadlines.for_bounded(c.timeout_ms);
        client::wait(&c.conn, deadline, id).await
    }

    #[tracing::instrument(
        name = "nested",
        skip_all,
        err(level = "debug"),
        fields(op = "destroy", cell = %id)
    )]
    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        self.destroy_incarnation(id, None).await
    }

    fn footprint(&self, id: &str) -> Footprint {
        let outer_id = self.outer_id(id);
        let mut f = merge(self.inner_footprint(id), self.outer().footprint(&outer_id));
        f.paths.push(self.socket(&outer_id));
        f.paths.push(self.inner.root.join("state").join(&outer_id));
        // The outer layer's things are named by the outer id, not the inner one (its cgroups,
        // its socket, the driver's command line): without it, a recovery after a killed harness
        // could not tell them from a shared parent and would leave them.
        f.process_markers.push(outer_id);
        f
    }

    #[tracing::instrument(
        name = "nested",
        skip_all,
        err(level = "debug"),
        fields(op = "exec", cell = %id)
    )]
    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        self.inner.caps.require(Capability::Exec)?;
        let c = self.live(id)?;
        client::exec(&c.conn, &self.inner.opts.deadlines, id, &req).await
    }

    #[tracing::instrument(
        name = "nested",
        skip_all,
        err(level = "debug"),
        fields(op = "pause", cell = %id)
    )]
    async fn pause(&self, id: &str) -> Result<(), CellError> {
        self.inner.caps.require(Capability::Pause)?;
        let c = self.live(id)?;
        client::pause(&c.conn, &self.inner.opts.deadlines, id).await
    }

    #[tracing::instrument(
        name = "nested",
        skip_all,
        err(level = "debug"),
        fields(op = "resume", cell = %id)
    )]
    async fn resume(&self, id: &str) -> Result<(), CellError> {
        self.inner.caps.require(Capability::Pause)?;
        let c = self.live(id)?;
        client::resume(&c.conn, &self.inner.opts.deadlines, id).await
    }

    async fn list(&self) -> Vec<String> {
        self.inner.cells.list()
    }
}
