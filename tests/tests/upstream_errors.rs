//! Upstream failures become gateway answers: 502 when the endpoint refuses,
//! 504 when it does not answer in time or cannot be connected in time.

use std::time::{Duration, Instant};

use sluice_tests::client::{fetch, get};
use sluice_tests::{Manifest, Mode, Origin};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// An address nothing listens on: bind a port, then free it.
async fn refused_addr() -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    drop(listener);
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_gives_502() -> anyhow::Result<()> {
    let dead = refused_addr().await?;
    let gateway = Manifest::simple(dead, "", "connect_timeout = \"5s\"")
        .start()
        .await?;

    let started = Instant::now();
    let reply = fetch(gateway.addr("web"), get("app.test", "/")).await?;
    assert_eq!(reply.status, 502, "{}", reply.excerpt());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a refused connect fails at once, not by timeout"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_that_never_answers_gives_504_after_timeout() -> anyhow::Result<()> {
    let origin = Origin::start("stall", Mode::Stall).await?;
    let gateway = Manifest::simple(origin.addr(), "", "timeout = \"300ms\"")
        .start()
        .await?;

    let started = Instant::now();
    let reply = fetch(gateway.addr("web"), get("app.test", "/slow")).await?;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.excerpt());
    assert!(
        elapsed >= Duration::from_millis(300),
        "answered after {elapsed:?}, before the 300ms timeout"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "answered after {elapsed:?}, far past the 300ms timeout"
    );
    assert_eq!(
        origin.requests(),
        1,
        "the origin got the request and sat on it"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_origin_within_timeout_is_not_cut_off() -> anyhow::Result<()> {
    let origin = Origin::start("slow", Mode::Delay(Duration::from_millis(200))).await?;
    let gateway = Manifest::simple(origin.addr(), "", "timeout = \"2s\"")
        .start()
        .await?;

    let reply = fetch(gateway.addr("web"), get("app.test", "/")).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(reply.json()?["origin"], "slow");
    Ok(())
}

/// A listener with a backlog of 0 that never accepts: once its accept queue
/// holds what the kernel allows, Linux drops further SYNs, so a connect hangs
/// until the connector's own timeout. Returns the listener, the connections
/// filling its queue (keep them alive) and its address.
async fn blackhole() -> anyhow::Result<(TcpListener, Vec<TcpStream>, std::net::SocketAddr)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let listener = socket.listen(0)?;
    let addr = listener.local_addr()?;
    let mut fillers = Vec::new();
    for _ in 0..64 {
        match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(error)) => anyhow::bail!("filling the accept queue: {error}"),
            Err(_) => return Ok((listener, fillers, addr)),
        }
    }
    anyhow::bail!("the accept queue never filled: this kernel does not drop SYNs on a full queue")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_gives_504() -> anyhow::Result<()> {
    let (_listener, _fillers, addr) = blackhole().await?;
    let gateway = Manifest::simple(addr, "", "connect_timeout = \"300ms\"\ntimeout = \"20s\"")
        .start()
        .await?;

    let started = Instant::now();
    let reply = fetch(gateway.addr("web"), get("app.test", "/")).await?;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.excerpt());
    assert!(
        reply.text().contains("connect"),
        "a connect timeout, not a response timeout: {:?}",
        reply.text()
    );
    assert!(
        elapsed >= Duration::from_millis(300),
        "answered after {elapsed:?}, before the connect timeout"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "answered after {elapsed:?}: the 300ms connect timeout was not applied"
    );
    Ok(())
}
