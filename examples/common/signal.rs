//! Shared by the examples: wait for the signals that ask a program to stop.

/// Resolves when the process is asked to stop: SIGINT (Ctrl+C) or, on Unix,
/// SIGTERM (what systemd, Docker and Kubernetes send). Returns the signal's
/// name.
pub async fn shutdown_signal() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.map(|()| "SIGINT"),
            _ = terminate.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map(|()| "Ctrl+C")
    }
}
