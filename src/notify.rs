//! systemd's notify protocol (sd_notify), without libsystemd: datagrams
//! `READY=1`, `WATCHDOG=1`, `STATUS=...`, `STOPPING=1` to `$NOTIFY_SOCKET`.
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.
//!
//! The watchdog is pinged from the pipeline loop itself (its tick and its
//! retry waits), so a wedged loop stops the pings and systemd restarts it.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
    /// Half of `$WATCHDOG_USEC`, as systemd recommends; `None` when off.
    watchdog_every: Option<Duration>,
    last_watchdog: Option<Instant>,
    ready_sent: bool,
}

/// Half of `$WATCHDOG_USEC`, as systemd recommends; `None` when the watchdog
/// is off, or when `$WATCHDOG_PID` names another process (the variables were
/// inherited, e.g. by a command an `ExecStartPre=` ran).
fn watchdog_every(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if pid.is_some_and(|pid| pid.parse::<u32>().ok() != Some(own_pid)) {
        return None;
    }
    usec.and_then(|usec| usec.parse::<u64>().ok())
        .filter(|usec| *usec > 0)
        .map(|usec| Duration::from_micros(usec / 2))
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let socket = UnixDatagram::unbound().ok()?;
            Some((socket, path))
        });
        let watchdog_every = watchdog_every(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Notifier {
            socket,
            watchdog_every,
            last_watchdog: None,
            ready_sent: false,
        }
    }

    fn send(&self, message: &str) {
        let Some((socket, path)) = &self.socket else {
            return;
        };
        let result = match path.strip_prefix('@') {
            // Abstract socket namespace (Linux): systemd may use one.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
            }
            None => socket.send_to(message.as_bytes(), path),
        };
        if let Err(e) = result {
            tracing::debug!("sd_notify {message:?}: {e}");
        }
    }

    /// Tells systemd the service is up (once).
    pub fn ready(&mut self, status: &str) {
        if !self.ready_sent {
            self.ready_sent = true;
            self.send(&format!("READY=1\nSTATUS={status}"));
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready_sent
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// Pings the watchdog if half its interval has passed.
    pub fn watchdog(&mut self) {
        let Some(every) = self.watchdog_every else {
            return;
        };
        if self
            .last_watchdog
            .is_none_or(|last| last.elapsed() >= every)
        {
            self.last_watchdog = Some(Instant::now());
            self.send("WATCHDOG=1");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_by_the_process_systemd_named_only() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_every(Some("30000000"), None, 7), half);
        assert_eq!(watchdog_every(Some("30000000"), Some("7"), 7), half);
        assert_eq!(watchdog_every(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_every(Some("30000000"), Some("x"), 7), None);
        assert_eq!(watchdog_every(Some("0"), None, 7), None);
        assert_eq!(watchdog_every(None, Some("7"), 7), None);
    }
}
