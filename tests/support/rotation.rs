//! The rotation scenario every key source must pass: 4 clients send steadily while the key is
//! rotated 5 times, and the upstream accepts only the newest key from the moment it is written.
//! No client may see an error, and every request the upstream saw carried exactly one whole key.

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::TestUpstream;

pub const ROTATIONS: usize = 5;
const CLIENTS: usize = 4;
/// Accepted requests to wait for after each rotation, so every key really carried traffic.
const REQUESTS_PER_KEY: u64 = 12;

/// Run the scenario against a proxy at `proxy_base` (`http://127.0.0.1:PORT`) whose source
/// currently holds `first_key`; `write_key` puts a new value into the source.
pub async fn rotate_under_load<F, Fut>(proxy_base: &str, upstream: &TestUpstream, first_key: &str, mut write_key: F)
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = ()>,
{
    *upstream.state.accepted_key.lock().await = Some(first_key.to_string());
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for client_no in 0..CLIENTS {
        let (stop, errors, base) = (stop.clone(), errors.clone(), proxy_base.to_string());
        clients.push(tokio::spawn(async move {
            let client = super::client();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let request = if n % 2 == 0 {
                    Request::get(format!("{base}/waves/v1/lightning/get_voices")).body(Full::new(Bytes::new()))
                } else {
                    Request::post(format!("{base}/waves/v1/lightning-v2/get_speech"))
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(format!(
                            r#"{{"text":"client {client_no} request {n}"}}"#
                        ))))
                }
                .expect("request");
                match client.request(request).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        let _ = response.into_body().collect().await;
                    }
                    Ok(response) => {
                        let status = response.status();
                        let body = response
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        errors
                            .lock()
                            .expect("errors")
                            .push(format!("{status}: {}", String::from_utf8_lossy(&body)));
                    }
                    Err(e) => errors.lock().expect("errors").push(format!("transport: {e}")),
                }
            }
        }));
    }

    upstream.state.wait_accepted(REQUESTS_PER_KEY).await;
    let mut keys = vec![first_key.to_string()];
    for round in 1..=ROTATIONS {
        let key = format!("sk-rotated-{round}-{:08x}", rand::random::<u32>());
        {
            // The upstream checks keys under this lock: it switches to the new key at the
            // moment the source holds it, with no window where either side is ahead.
            let mut accepted = upstream.state.accepted_key.lock().await;
            write_key(key.clone()).await;
            *accepted = Some(key.clone());
        }
        keys.push(key);
        let seen = *upstream.state.accepted_count.borrow();
        upstream.state.wait_accepted(seen + REQUESTS_PER_KEY).await;
    }
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.expect("client task");
    }

    let errors = errors.lock().expect("errors").clone();
    assert!(
        errors.is_empty(),
        "{} client-visible errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    let records = upstream.records();
    assert!(records.len() as u64 >= REQUESTS_PER_KEY * (ROTATIONS as u64 + 1));
    let whole_keys: Vec<String> = keys.iter().map(|k| format!("Bearer {k}")).collect();
    for record in &records {
        let values: Vec<_> = record.headers.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(
            values.len(),
            1,
            "a request carried {} Authorization headers",
            values.len()
        );
        let value = values[0].to_str().expect("ascii");
        assert!(
            whole_keys.iter().any(|k| k == value),
            "a request carried a key that is not one whole rotated key"
        );
    }
}
