//! CPU priority by phase. A rehydrate or catch-up is a bulk load that keeps
//! a core busy; while it runs the agent raises its niceness, so the local
//! apps reading Redis preempt it (GET p99 0.7 ms against 1.5 ms on 2
//! cores). Live updates are small and latency-bound, so once caught up the
//! agent returns to the niceness it started with: at the lower priority, a
//! busy box delayed them by up to 300 ms at 20k records/s (BENCHMARKS.md).
//!
//! Linux niceness is per thread, so every thread of the process is set,
//! librdkafka's included; threads created later inherit their creator's.
//! Going back down needs RLIMIT_NICE (the unit's `LimitNICE=+0`) or root;
//! without it the agent warns once and stays where it is.

use tracing::{info, warn};

/// The agent's niceness, switched between the bulk and the live value.
#[derive(Debug)]
pub struct Priority {
    /// The niceness at start: the live value.
    base: i32,
    /// The niceness while rehydrating or catching up.
    bulk: i32,
    current: i32,
    /// A change failed once: stop trying (warned then).
    stuck: bool,
}

impl Priority {
    /// `bulk_increment` is added to the start niceness while catching up
    /// (0 turns the switching off).
    pub fn new(bulk_increment: u8) -> Priority {
        let base = os::niceness();
        Priority {
            base,
            bulk: (base + i32::from(bulk_increment)).min(19),
            current: base,
            stuck: bulk_increment == 0,
        }
    }

    /// Sets the niceness for the phase: `bulk` while rehydrating or
    /// catching up, the start value when live.
    pub fn set(&mut self, bulk: bool) {
        let wanted = if bulk { self.bulk } else { self.base };
        if self.stuck || wanted == self.current {
            return;
        }
        match os::set_niceness(wanted) {
            Ok(()) => {
                info!(niceness = wanted, "CPU priority for {}", phase(bulk));
                self.current = wanted;
            }
            Err(e) => {
                // Raising needs setpriority past a syscall filter; lowering
                // also needs RLIMIT_NICE.
                let hint = if wanted > self.current {
                    "a unit's SystemCallFilter must allow setpriority"
                } else {
                    "returning needs RLIMIT_NICE: LimitNICE=+0 in the unit"
                };
                warn!(
                    "cannot set niceness {wanted} for {} ({e}; {hint}); it stays {} \
                     from now on",
                    phase(bulk),
                    self.current
                );
                self.stuck = true;
            }
        }
    }
}

fn phase(bulk: bool) -> &'static str {
    if bulk {
        "catching up"
    } else {
        "live updates"
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod os {
    use std::io;

    pub fn niceness() -> i32 {
        // SAFETY: getpriority only reads the calling thread's priority. -1 is
        // a valid niceness, so errors are told apart by errno, cleared first.
        unsafe {
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
            if nice == -1 && *libc::__errno_location() != 0 {
                0
            } else {
                nice
            }
        }
    }

    pub fn set_niceness(nice: i32) -> io::Result<()> {
        for entry in std::fs::read_dir("/proc/self/task")? {
            let Some(tid) = entry?
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::id_t>().ok())
            else {
                continue;
            };
            // SAFETY: setpriority changes a thread's scheduling weight only;
            // no memory is passed.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
                let e = io::Error::last_os_error();
                // A thread that exited since the directory was read.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    pub fn niceness() -> i32 {
        0
    }

    pub fn set_niceness(_: i32) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "per-thread niceness is Linux-only",
        ))
    }
}
