//! Builds each worker's handler from the configuration: the one module that knows every handler
//! kind, above the handlers themselves (`handler` for `dots` and `command`, `pipe`), so that no
//! handler needs to know another.

use std::sync::Arc;

use crate::config;
use crate::handler::{CommandHandler, Dots, HandlerFactory};
use crate::metrics::Metrics;
use crate::pipe::PipeHandler;

/// The factory for the configured handler. `metrics` are the pool's, which a `pipe` handler
/// counts its recycled programs in.
pub fn from_config(
    handler: &config::HandlerConfig,
    queue: &str,
    metrics: &Arc<Metrics>,
) -> HandlerFactory {
    let timeout = handler.timeout;
    match &handler.kind {
        config::HandlerKind::Dots => Arc::new(move |_| Box::new(Dots { timeout })),
        config::HandlerKind::Pipe { argv, recycle } => {
            let (argv, queue, kill_grace) = (argv.clone(), queue.to_string(), handler.kill_grace);
            let (recycle, metrics) = (*recycle, Arc::clone(metrics));
            Arc::new(move |worker| {
                Box::new(
                    PipeHandler::new(argv.clone(), &queue, worker, timeout, kill_grace)
                        .recycled(recycle, Arc::clone(&metrics)),
                )
            })
        }
        config::HandlerKind::Command { argv, reply } => {
            let (argv, queue, kill_grace, reply) =
                (argv.clone(), queue.to_string(), handler.kill_grace, *reply);
            Arc::new(move |worker| {
                Box::new(
                    CommandHandler::new(&argv, &queue, worker, timeout, kill_grace).replying(reply),
                )
            })
        }
    }
}
