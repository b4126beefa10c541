//! `--metrics-listen`: Prometheus text at `/metrics`, and `/healthz` and `/readyz`, over plain
//! HTTP/1.1 (hyper), with every wait bounded and at most [`MAX_CONNECTIONS`] connections at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::status::{Status, UNHEALTHY_AFTER};

/// The delay histogram's name (see [`Status::record_delay`]).
pub const DELAY_HISTOGRAM: &str = "iot_sub_delivery_delay_seconds";

/// Upper bounds of the delay histogram's buckets, in seconds.
pub const DELAY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 64;

/// A request's headers must arrive within this long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection (keep-alive included) is closed after this long; a request in progress then
/// gets [`CLOSE_GRACE`] to finish.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How long a closing connection may take to finish its response.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Installs the process-wide Prometheus recorder behind the `metrics` facade and describes the
/// metrics the run emits. Fails if another recorder is already installed.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DELAY_HISTOGRAM.to_string()), DELAY_BUCKETS)
        .and_then(|b| b.install_recorder())
        .context("cannot install the metrics recorder")?;
    describe();
    Ok(handle)
}

/// HELP lines for every metric (the names are the ones [`Status`] records).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "iot_sub_messages_received_total",
        "Deliveries received from the cloud."
    );
    describe_counter!(
        "iot_sub_messages_written_total",
        "Messages written to the output (or handled by --exec-each)."
    );
    describe_counter!(
        "iot_sub_messages_accepted_total",
        "Deliveries accepted (settled as done) after their output."
    );
    describe_counter!(
        "iot_sub_messages_rejected_total",
        "Deliveries rejected as undecodable."
    );
    describe_counter!(
        "iot_sub_messages_released_total",
        "Deliveries released back to the cloud for redelivery."
    );
    describe_counter!(
        "iot_sub_messages_duplicate_total",
        "Duplicate deliveries dropped (same messageId written recently)."
    );
    describe_counter!(
        "iot_sub_messages_filtered_total",
        "Messages dropped by --topic/--exclude-topic (still accepted)."
    );
    describe_counter!(
        "iot_sub_reconnects_total",
        "Failed connection attempts and lost connections, by cause."
    );
    describe_gauge!("iot_sub_connected_links", "Receiver links attached now.");
    describe_gauge!(
        "iot_sub_up",
        "1 while healthy (a link is up, or was lost only recently), else 0."
    );
    describe_gauge!(
        "iot_sub_in_flight",
        "Deliveries handed to the output and not yet settled."
    );
    describe_gauge!("iot_sub_link_credit", "Link credit a connection has left.");
    describe_gauge!(
        "iot_sub_tokio_alive_tasks",
        "Tasks alive in the async runtime (flat over a long run; growth means a leak)."
    );
    describe_histogram!(
        DELAY_HISTOGRAM,
        Unit::Seconds,
        "Delay from a message's generateTime to its output."
    );
}

/// Binds `addr` and serves until `stop` is cancelled; returns the bound address.
pub async fn start(
    addr: SocketAddr,
    handle: PrometheusHandle,
    status: Arc<Status>,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    tokio::spawn(serve(listener, handle, status, stop));
    Ok(bound)
}

async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    status: Arc<Status>,
    stop: CancellationToken,
) {
    tokio::spawn(upkeep(handle.clone(), stop.clone()));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.cancelled() => return,
        };
        let stream = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => break stream,
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "metrics: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = stop.cancelled() => return,
            }
        };
        let _ = stream.set_nodelay(true);
        let (handle, status, stop) = (handle.clone(), status.clone(), stop.clone());
        tokio::spawn(async move {
            connection(stream, handle, status, stop).await;
            drop(permit);
        });
    }
}

/// Folds histogram samples into their buckets now and then, so memory stays flat however
/// rarely /metrics is scraped.
async fn upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = stop.cancelled() => return,
        }
    }
}

/// Serves one connection, bounded by [`HEADER_READ_TIMEOUT`], [`CONNECTION_LIFETIME`] and the
/// run's stop.
async fn connection(
    stream: tokio::net::TcpStream,
    handle: PrometheusHandle,
    status: Arc<Status>,
    stop: CancellationToken,
) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let response = respond(req.method(), req.uri().path(), &handle, &status);
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "metrics: connection ended");
            }
            return;
        }
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
        _ = stop.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

/// The response to one request.
fn respond(
    method: &Method,
    path: &str,
    handle: &PrometheusHandle,
    status: &Status,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => {
            status.sync_metrics();
            let mut r = text(StatusCode::OK, handle.render());
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
            r
        }
        "/healthz" if status.healthy() => text(StatusCode::OK, "ok\n".into()),
        "/healthz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "unhealthy: no receiver link attached for more than {}\n",
                humantime::format_duration(UNHEALTHY_AFTER)
            ),
        ),
        "/readyz" if status.ready() => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no receiver link attached yet\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found (try /metrics, /healthz, /readyz)\n".into(),
        ),
    }
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    let headers = r.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Counters;

    #[test]
    fn routes_and_methods() {
        // A recorder that is not installed: render works on its own handle.
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let status = Status::new(Arc::new(Counters::default()), 1);
        let code = |m: Method, p: &str| respond(&m, p, &handle, &status).status();
        assert_eq!(code(Method::GET, "/metrics"), StatusCode::OK);
        assert_eq!(code(Method::GET, "/healthz"), StatusCode::OK);
        assert_eq!(
            code(Method::GET, "/readyz"),
            StatusCode::SERVICE_UNAVAILABLE
        );
        status.link_attached();
        assert_eq!(code(Method::GET, "/readyz"), StatusCode::OK);
        assert_eq!(code(Method::HEAD, "/readyz"), StatusCode::OK);
        assert_eq!(code(Method::GET, "/"), StatusCode::NOT_FOUND);
        let r = respond(&Method::POST, "/metrics", &handle, &status);
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "GET, HEAD");
        let r = respond(&Method::GET, "/metrics", &handle, &status);
        assert_eq!(r.headers()[CONTENT_TYPE], PROMETHEUS_TEXT);
    }
}
