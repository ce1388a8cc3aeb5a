//! Bodies stream through the gateway frame by frame, both ways, and HTTP/2
//! clients reach HTTP/1.1 origins.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Request;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use sluice_tests::client::{ChannelBody, H1, H2, channel_body, get};
use sluice_tests::origin::hex;
use sluice_tests::{Manifest, Mode, Origin, WAIT, within};

/// Reads response frames until at least `want` bytes have arrived.
async fn read_at_least(body: &mut hyper::body::Incoming, want: usize) -> anyhow::Result<BytesMut> {
    let mut got = BytesMut::new();
    while got.len() < want {
        let frame = body
            .frame()
            .await
            .ok_or_else(|| anyhow::anyhow!("body ended after {} of {want} bytes", got.len()))??;
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    Ok(got)
}

fn post_stream(body: ChannelBody) -> anyhow::Result<Request<ChannelBody>> {
    Ok(Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "app.test")
        .body(body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_reaches_the_origin_intact() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "", "").start().await?;

    let chunks: Vec<Bytes> = (0..5u8)
        .map(|i| Bytes::from(vec![b'a' + i; 1000 + usize::from(i) * 333]))
        .collect();
    let expected: Vec<u8> = chunks.concat();
    let (tx, body) = channel_body(8);
    let mut conn = H1::<ChannelBody>::connect(gateway.addr("web")).await?;
    let sender = tokio::spawn(async move {
        for chunk in chunks {
            if tx.send(chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let reply = conn.request(post_stream(body)?).await?;
    within("the sender task", WAIT, sender).await??;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    let json = reply.json()?;
    assert_eq!(json["body_bytes"], expected.len());
    assert_eq!(json["body_sha256"], hex(&Sha256::digest(&expected)));

    let seen = origin
        .last_request()
        .ok_or_else(|| anyhow::anyhow!("origin saw no request"))?;
    assert!(
        seen.headers.get("content-length").is_none(),
        "a chunked body has no length to forward"
    );
    assert_eq!(
        seen.headers
            .get("transfer-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("chunked"),
        "the body is forwarded chunked, not buffered into a Content-Length"
    );
    Ok(())
}

/// 50 MiB up and the same 50 MiB back, through an origin that echoes the
/// request body as it arrives. The client gets the echo of its first chunk
/// before it sends the rest: no hop may wait for the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_stream_both_ways_without_buffering() -> anyhow::Result<()> {
    const CHUNK: usize = 64 * 1024;
    const TOTAL: usize = 50 * 1024 * 1024;
    let origin = Origin::start("echo", Mode::StreamEcho).await?;
    let gateway = Manifest::simple(origin.addr(), "", "").start().await?;

    // A chunk that differs per index, so reordering or duplication shows in the hash.
    let chunk = |i: usize| {
        let mut data = vec![0u8; CHUNK];
        for (j, byte) in data.iter_mut().enumerate() {
            *byte = (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8;
        }
        Bytes::from(data)
    };
    let (tx, body) = channel_body(4);
    let mut conn = H1::<ChannelBody>::connect(gateway.addr("web")).await?;

    let first = chunk(0);
    tx.send(first.clone()).await?;
    let response = conn.send(post_stream(body)?).await?;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let echoed = within(
        "the echo of the first chunk, before the rest of the body is sent",
        WAIT,
        read_at_least(&mut body, first.len()),
    )
    .await??;
    assert_eq!(
        &echoed[..first.len()],
        &first[..],
        "the first chunk came back changed"
    );

    let mut sent_hash = Sha256::new();
    sent_hash.update(&first);
    let sender = tokio::spawn(async move {
        let mut sent = CHUNK;
        let mut index = 1;
        while sent < TOTAL {
            let data = chunk(index);
            sent_hash.update(&data);
            sent += data.len();
            index += 1;
            if tx.send(data).await.is_err() {
                break;
            }
        }
        (sent, hex(&sent_hash.finalize()))
    });

    let mut received_hash = Sha256::new();
    received_hash.update(&echoed);
    let mut received = echoed.len();
    let rest = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                received += data.len();
                received_hash.update(&data);
            }
        }
        anyhow::Ok(())
    };
    within(
        "the rest of the 50 MiB echo",
        Duration::from_secs(120),
        rest,
    )
    .await??;
    let (sent, sent_digest) = within("the sender task", WAIT, sender).await??;
    assert_eq!(sent, TOTAL);
    assert_eq!(received, TOTAL, "echoed length");
    assert_eq!(
        hex(&received_hash.finalize()),
        sent_digest,
        "echoed content"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_client_reaches_http11_origin() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "", "").start().await?;

    let mut conn = H2::connect(gateway.addr("web")).await?;
    for path in ["/first", "/second?x=1"] {
        let mut req = get("ignored", path);
        req.headers_mut().remove("host");
        *req.uri_mut() = format!("http://h2.example.com{path}").parse()?;
        let reply = conn.request(req).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
        assert_eq!(reply.version, http::Version::HTTP_2);

        let seen = origin
            .last_request()
            .ok_or_else(|| anyhow::anyhow!("origin saw no request"))?;
        assert_eq!(
            seen.version,
            http::Version::HTTP_11,
            "the origin hop is HTTP/1.1"
        );
        assert_eq!(
            seen.headers.get("host").and_then(|v| v.to_str().ok()),
            Some("h2.example.com")
        );
        assert_eq!(seen.uri.to_string(), path, "origin-form target");
        assert_eq!(
            seen.headers.get("via").and_then(|v| v.to_str().ok()),
            Some("2 sluice")
        );
    }
    assert_eq!(origin.requests(), 2);
    Ok(())
}
