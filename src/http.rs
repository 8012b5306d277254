//! The metrics endpoint: `/metrics` in Prometheus' text format and `/healthz` (200 when every
//! worker is connected, saying so when they are paused; 503 with the reason otherwise), served by
//! tiny_http on one thread.
//!
//! It only reads [`Metrics`]; it never touches the pool or the broker, so a slow scraper cannot
//! hold up a worker. Started by `warren run` when `metrics.listen` is set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use tiny_http::{Header, Response, Server};

use crate::metrics::Metrics;

/// Listens on `listen` and serves until the process exits. Fails at once if it cannot listen.
pub fn serve(listen: SocketAddr, metrics: Arc<Metrics>) -> Result<JoinHandle<()>, String> {
    let server = Server::http(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    log::info!("serving /metrics and /healthz on http://{listen}");
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let path = request.url().split('?').next().unwrap_or("");
                let (status, body, content_type) = match path {
                    "/metrics" => (
                        200,
                        metrics.encode(),
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                    "/healthz" => match metrics.health() {
                        Ok(None) => (200, "ok\n".to_string(), "text/plain; charset=utf-8"),
                        Ok(Some(paused)) => (
                            200,
                            format!("ok; paused: {paused}\n"),
                            "text/plain; charset=utf-8",
                        ),
                        Err(why) => (503, format!("{why}\n"), "text/plain; charset=utf-8"),
                    },
                    _ => (
                        404,
                        "not found: try /metrics or /healthz\n".to_string(),
                        "text/plain; charset=utf-8",
                    ),
                };
                let mut response = Response::from_string(body).with_status_code(status);
                if let Ok(header) = Header::from_bytes("Content-Type", content_type) {
                    response = response.with_header(header);
                }
                if let Err(e) = request.respond(response) {
                    log::debug!("metrics: cannot answer a request: {e}");
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))
}
