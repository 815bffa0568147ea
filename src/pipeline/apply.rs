//! Batches into Redis: one apply in flight at most, retried until Redis takes
//! it (G6), and the rehydrate when Redis lost or changed what the agent
//! wrote (G4).

use super::{stored_starts, Flow, Pipeline, Reload, State};
use crate::backoff::Backoff;
use crate::batch::Batch;
use crate::checkpoint::Start;
use crate::sink::{PendingApply, SinkError};
use crate::source::Source;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// A batch sent by [`Pipeline::send`], kept until Redis confirmed it: an
/// unreachable Redis means applying it again, before any later batch.
pub(super) struct InFlight {
    pub(super) batch: Batch,
    pub(super) started: Instant,
    pub(super) pending: PendingApply,
}

impl Pipeline<'_> {
    /// Applies the batch and waits for Redis's reply, after the batch in
    /// flight; retries until Redis takes it (G6), or rehydrates when Redis
    /// lost our state (G4).
    pub(super) async fn flush(&mut self, source: &Source) -> Flow {
        let flow = self.settle_in_flight(source).await;
        if flow != Flow::Continue || self.batch.is_empty() {
            return flow;
        }
        let mut batch = self.take_batch();
        let flow = self.apply_retrying(source, &mut batch, None).await;
        self.return_batch(batch);
        flow
    }

    /// Sends the batch without waiting for Redis's reply, so the next batch
    /// is decoded while Redis runs this one's script (during a rehydrate
    /// the two take similar time, on different cores). The batch sent
    /// before is settled first: one apply at most is in flight, so batches
    /// reach Redis in order and one that failed is applied again before
    /// any later one.
    pub(super) async fn send(&mut self, source: &Source) -> Flow {
        let flow = self.settle_in_flight(source).await;
        if flow != Flow::Continue || self.batch.is_empty() {
            return flow;
        }
        let mut batch = self.take_batch();
        match self.sink.submit(&batch, &self.fields).await {
            Ok(pending) => {
                self.in_flight = Some(InFlight {
                    batch,
                    started: Instant::now(),
                    pending,
                });
                // Let the connection's task write the command now rather
                // than when this task next waits, maybe a batch later.
                tokio::task::yield_now().await;
                Flow::Continue
            }
            Err(e) => {
                let flow = self.apply_retrying(source, &mut batch, Some(e)).await;
                self.return_batch(batch);
                flow
            }
        }
    }

    /// Waits for the batch in flight, if any, and settles it.
    pub(super) async fn settle_in_flight(&mut self, source: &Source) -> Flow {
        let Some(InFlight {
            mut batch,
            started,
            mut pending,
        }) = self.in_flight.take()
        else {
            return Flow::Continue;
        };
        let mut stop = self.stop.clone();
        let result = tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                // Shutdown gives it a last chance.
                self.in_flight = Some(InFlight { batch, started, pending });
                return Flow::Stop;
            }
            joined = &mut pending => crate::sink::finish(joined),
        };
        self.sink.settle(&result);
        let flow = match result {
            Ok(()) => {
                self.applied(source, &batch, started).await;
                Flow::Continue
            }
            Err(e) => self.apply_retrying(source, &mut batch, Some(e)).await,
        };
        self.return_batch(batch);
        flow
    }

    /// Applies `batch` until Redis takes it; `failed` is the error of an
    /// attempt already made.
    pub(super) async fn apply_retrying(
        &mut self,
        source: &Source,
        batch: &mut Batch,
        mut failed: Option<SinkError>,
    ) -> Flow {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let started = Instant::now();
            let result = match failed.take() {
                Some(e) => Err(e),
                None => {
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return Flow::Stop,
                        result = self.sink.apply(batch, &self.fields) => result,
                    }
                }
            };
            match result {
                Ok(()) => {
                    self.applied(source, batch, started).await;
                    return Flow::Continue;
                }
                Err(SinkError::Lost) => return Flow::Reload(Reload::Lost),
                Err(SinkError::Diverged(why)) => return Flow::Reload(Reload::Diverged(why)),
                Err(e) => {
                    if self.redis_problem.as_ref().map(|p| p.0.as_str()) != Some(e.reason()) {
                        warn!("{e}; keeping the batch and retrying");
                    }
                    self.redis_refuses(&e).await;
                    // Lag and the metrics stay current while the batch waits.
                    self.lag = self.lag(source).or(self.lag);
                    self.retrying = true;
                    self.report(source).await;
                    self.retrying = false;
                    if self.pause(backoff.next_delay()).await == Flow::Stop {
                        return Flow::Stop;
                    }
                }
            }
        }
    }

    /// Bookkeeping once Redis applied `batch`.
    pub(super) async fn applied(&mut self, source: &Source, batch: &Batch, started: Instant) {
        self.metrics.applied(batch, started.elapsed());
        if self.caught_up {
            self.metrics
                .live_records_aged(batch.oldest_ts_ms(), batch.counts().records);
        }
        debug!(
            n_ops = batch.n_ops(),
            n_records = batch.counts().records,
            micros = started.elapsed().as_micros() as u64,
            "applied"
        );
        for (&partition, &next) in batch.next_offsets() {
            self.positions.insert(partition, Start::At(next));
        }
        let counts = batch.counts();
        self.progress.applied(counts.records + counts.noted);
        self.last_apply = Instant::now();
        if self.redis_problem.is_some() || self.state == State::RedisUnreachable {
            self.redis_fine().await;
            self.write_state().await;
        }
        if !self.caught_up && !source.brokers_down() && self.applied_all_fetched(source) {
            self.go_live();
            self.write_state().await;
        }
    }

    /// The batch to apply, leaving an empty one to fill.
    pub(super) fn take_batch(&mut self) -> Batch {
        let limits = &self.settings.limits;
        let empty = self
            .spare
            .take()
            .unwrap_or_else(|| Batch::new(limits.max_batch_records, limits.max_batch_bytes));
        std::mem::replace(&mut self.batch, empty)
    }

    pub(super) fn return_batch(&mut self, mut batch: Batch) {
        batch.clear();
        self.spare = Some(batch);
    }

    /// Nothing waits to be applied or confirmed.
    pub(super) fn idle(&self) -> bool {
        self.batch.is_empty() && self.in_flight.is_none()
    }

    /// Redis no longer holds what the agent wrote: drop the batches in
    /// hand, adopt (or recreate) the marker, and read every partition again
    /// from the offsets Redis holds now (the earliest when it holds none).
    /// A resync in progress starts again from there. Called by the loop
    /// only ([`Pipeline::follow`]): Continue or Stop.
    pub(super) async fn rehydrate(&mut self, source: &Source, why: Reload) -> Flow {
        match &why {
            Reload::Lost => {
                warn!("Redis lost the agent's state (flushed, restarted without persistence, or replaced): rehydrating from the offsets it holds, or the earliest");
                self.metrics.rehydrated();
            }
            Reload::Diverged(detail) => {
                warn!("Redis changed under the agent ({detail}): restored from an older snapshot or backup, a replica promoted, or a torn append-only file; resuming from the offsets Redis holds now");
                self.metrics.diverged();
            }
        }
        self.batch.clear();
        // Its script fails on the marker or sequence check if it has not run yet.
        self.in_flight = None;
        let resync = self.resync.take();
        self.sink.abandon_resync();
        if self.connect_redis().await == Flow::Stop {
            return Flow::Stop;
        }
        if matches!(why, Reload::Diverged(_)) {
            self.sink.bump_status("redis_divergences").await;
        }
        for (partition, start) in self.positions.iter_mut() {
            *start = self.stored.start(partition.0, partition.1);
        }
        self.reassign(source);
        let starts: Vec<_> = self.positions.iter().map(|(&p, &s)| (p, s)).collect();
        self.log_start_unchecked = stored_starts(&starts);
        self.restart_catch_up();
        self.written_lag = None;
        let mut lineage = self.stored.lineage_pending.clone();
        let mut topics = lineage.clone();
        if let Some(resync) = resync {
            if self.stored.next.is_empty() {
                info!("the resync is moot: everything is read again anyway");
            } else {
                topics.extend(resync.topics);
                lineage.extend(resync.lineage);
            }
        }
        if !topics.is_empty() && self.start_resync(source, topics, lineage).await == Flow::Stop {
            return Flow::Stop;
        }
        self.write_state().await;
        Flow::Continue
    }
}
