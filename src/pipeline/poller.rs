//! A background request repeated every so often, never waited for.

use futures_util::FutureExt;
use std::time::{Duration, Instant};

/// the broker. At most one request is out at a time.
/// A background request repeated every so often (topic configurations,
/// topic IDs, partition metadata): started when none is out and it is due,
/// its answer taken once its task has finished, so the loop never waits on
/// the broker. At most one request is out at a time.
#[derive(Debug)]
pub(super) struct Poller<T> {
    /// Where the interval counts from: the last start, or with
    /// `from_answer` the last answer; `None`: due at once.
    since: Option<Instant>,
    from_answer: bool,
    /// Start at the next chance, however recent `since` is.
    forced: bool,
    task: Option<tokio::task::JoinHandle<T>>,
}

impl<T> Poller<T> {
    /// The interval counts from each start.
    pub(super) fn from_start(since: Option<Instant>) -> Self {
        Poller {
            since,
            from_answer: false,
            forced: false,
            task: None,
        }
    }

    /// The interval counts from each answer.
    pub(super) fn from_answer(since: Instant) -> Self {
        Poller {
            from_answer: true,
            ..Poller::from_start(Some(since))
        }
    }

    /// The interval counts from now (the same request was just made
    /// another way).
    pub(super) fn restart_clock(&mut self) {
        self.since = Some(Instant::now());
    }

    /// Starts a request at the next [`Poller::poll`] with none out.
    pub(super) fn force(&mut self) {
        self.forced = true;
    }

    /// One step, never waiting: with no request out, starts one (`start`)
    /// if forced or `every` has passed; with one out and finished, returns
    /// its answer (`None` while none is ready).
    pub(super) fn poll(
        &mut self,
        every: Duration,
        start: impl FnOnce() -> tokio::task::JoinHandle<T>,
    ) -> Option<Result<T, tokio::task::JoinError>> {
        match self.task.take() {
            None => {
                if self.forced || self.since.is_none_or(|at| at.elapsed() >= every) {
                    self.forced = false;
                    if !self.from_answer {
                        self.since = Some(Instant::now());
                    }
                    self.task = Some(start());
                }
                None
            }
            Some(task) if !task.is_finished() => {
                self.task = Some(task);
                None
            }
            Some(task) => {
                if self.from_answer {
                    self.since = Some(Instant::now());
                }
                // The task has finished, so this does not wait.
                task.now_or_never()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts when due (at once without a clock), never two at once, the
    /// answer only once finished, then not again before the interval
    /// unless forced; `from_answer` counts the interval from the answer.
    #[test]
    fn poller_starts_when_due_and_takes_finished_answers() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let every = Duration::from_secs(3600);
            let mut poller = Poller::from_start(None);
            assert!(poller.poll(every, || tokio::spawn(async { 7 })).is_none());
            assert!(poller.task.is_some());
            while !poller.task.as_ref().unwrap().is_finished() {
                tokio::task::yield_now().await;
            }
            let answer = poller.poll(every, || unreachable!("one out already"));
            assert_eq!(answer.map(Result::unwrap), Some(7));
            assert!(poller.poll(every, || unreachable!("not due")).is_none());
            poller.force();
            assert!(poller.poll(every, || tokio::spawn(async { 8 })).is_none());
            assert!(poller.task.is_some() && !poller.forced);

            let start = Instant::now();
            let mut poller = Poller::from_answer(start);
            let due = Duration::ZERO;
            assert!(poller.poll(due, || tokio::spawn(async { 9 })).is_none());
            assert_eq!(poller.since, Some(start));
            while !poller.task.as_ref().unwrap().is_finished() {
                tokio::task::yield_now().await;
            }
            assert_eq!(
                poller.poll(every, || unreachable!()).map(Result::unwrap),
                Some(9)
            );
            assert!(poller.since > Some(start));
            assert!(poller.poll(every, || unreachable!("not due")).is_none());
        });
    }
}
