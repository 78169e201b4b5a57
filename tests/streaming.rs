//! Bodies stream through the proxy: big uploads and downloads pass whole at bounded memory,
//! and SSE events reach the client as the upstream writes them.

mod support;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use support::*;

const BIG: u64 = 256 * 1024 * 1024;
const RSS_LIMIT_KIB: u64 = 64 * 1024;

fn pattern_body(total: u64) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
    const CHUNK: u64 = 128 * 1024;
    StreamBody::new(futures_util::stream::iter((0..total.div_ceil(CHUNK)).map(move |i| {
        let offset = i * CHUNK;
        Ok(Frame::data(pattern::chunk(
            offset,
            (total - offset).min(CHUNK) as usize,
        )))
    })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_upload_and_download_pass_whole_at_bounded_memory() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, TEST_KEY).unwrap();
    let proxy = ProxyProcess::spawn(
        &proxy_config_text(&upstream.url(), &upstream.pki.ca_file, &key_file, ""),
        &[],
    );

    // Upload: 256 MiB generated on the fly, with Content-Length, checked byte by byte upstream.
    let client = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(proxy.url("/upload"))
        .header("content-length", BIG)
        .body(pattern_body(BIG))
        .unwrap();
    let response = client.request(req).await.expect("upload through proxy");
    assert_eq!(response.status(), StatusCode::OK);
    let answer = json(&response.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(answer["bytes"], BIG, "{answer}");
    assert_eq!(answer["pattern_ok"], true);

    // Upload without a length (chunked), as an app streaming audio would.
    let req = Request::post(proxy.url("/upload"))
        .body(pattern_body(32 * 1024 * 1024))
        .unwrap();
    let response = client.request(req).await.expect("chunked upload");
    let answer = json(&response.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(answer["bytes"], 32 * 1024 * 1024);
    assert_eq!(answer["pattern_ok"], true);

    // Download: read frame by frame, never holding the whole body.
    let response = support::client()
        .get(proxy.url(&format!("/download?bytes={BIG}")).parse().unwrap())
        .await
        .expect("download");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut checker = pattern::Checker::default();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.expect("download frame").data_ref() {
            checker.feed(data);
        }
    }
    assert_eq!(checker.len, BIG);
    assert!(checker.ok, "download corrupted");

    let peak = proxy.peak_rss_kib();
    eprintln!("proxy peak RSS after 2 x 256 MiB + 32 MiB: {peak} KiB");
    assert!(
        peak < RSS_LIMIT_KIB,
        "proxy peak RSS {peak} KiB over {RSS_LIMIT_KIB} KiB"
    );
}

#[tokio::test]
async fn sse_events_arrive_before_the_upstream_finishes() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let response = support::client()
        .get(proxy.url("/sse").parse().unwrap())
        .await
        .expect("sse");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(
        !response.headers().contains_key("content-encoding"),
        "no compression added"
    );
    let mut body = response.into_body();

    // The upstream holds its remaining events until released: the first one must get here
    // while the upstream is still mid-stream.
    let first = body
        .frame()
        .await
        .expect("first frame")
        .expect("frame ok")
        .into_data()
        .expect("data");
    assert_eq!(&first[..], b"event: audio\ndata: first\n\n");
    assert!(
        !upstream.state.sse_finished.load(Ordering::SeqCst),
        "first event was held until the stream ended"
    );

    upstream.state.sse_release.notify_one();
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(
        &rest[..],
        b"event: audio\ndata: event-2\n\nevent: audio\ndata: event-3\n\n"
    );
    assert!(upstream.state.sse_finished.load(Ordering::SeqCst));
    proxy.stop().await;
}
