//! Many cells (or execs) at once: [`Ctx::concurrently`] runs a scenario's jobs overlapping and
//! bounded, [`Ctx::run_many`] creates, waits and destroys a cell per document that way.

use super::*;

/// Jobs run at once at most: enough to overlap cells, few enough for a VM backend on a small host.
pub const PARALLEL: usize = 8;

impl Ctx {
    /// Run `job(0)` .. `job(n - 1)` on their own tasks, at most [`PARALLEL`] at a time; their
    /// results in job order. The first job that fails fails the scenario (the others still end:
    /// every cell they made is recorded, so the harness destroys it).
    pub async fn concurrently<T, Fut>(
        &self,
        n: usize,
        job: impl Fn(usize) -> Fut,
    ) -> Result<Vec<T>, Failure>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, Failure>> + Send + 'static,
    {
        let gate = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let (gate, fut) = (gate.clone(), job(i));
            tasks.spawn(async move {
                let _slot = gate.acquire_owned().await;
                fut.await.map(|t| (i, t))
            });
        }
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let mut first_err = None;
        while let Some(j) = tasks.join_next().await {
            match j.map_err(|e| self.fail(format!("a concurrent task failed: {e}")))? {
                Ok((i, t)) => out[i] = Some(t),
                Err(f) => {
                    first_err.get_or_insert(f);
                }
            }
        }
        if let Some(f) = first_err {
            return Err(f);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Create, wait and destroy each document, overlapping ([`Ctx::concurrently`]); each cell's
    /// id and wait result, in document order.
    pub async fn run_many(
        &self,
        docs: Vec<CellDocument>,
    ) -> Result<Vec<(String, Result<ExitReport, CellError>)>, Failure> {
        let docs = Arc::new(docs);
        self.concurrently(docs.len(), |i| {
            let (ctx, docs) = (self.clone(), docs.clone());
            async move {
                let h = ctx.create(&docs[i]).await?;
                let r = ctx.try_wait(&h.id).await;
                ctx.destroy(&h.id).await?;
                Ok((h.id, r))
            }
        })
        .await
    }
}
