//! WebSocket (HTTP/1.1 Upgrade) is tunnelled through the gateway.

use futures_util::{SinkExt, StreamExt};
use sluice_tests::client::connect;
use sluice_tests::{Manifest, Mode, Origin, WAIT, within};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_text_and_binary_messages_echo_through_the_gateway() -> anyhow::Result<()> {
    let origin = Origin::start("ws", Mode::WebSocketEcho).await?;
    let gateway = Manifest::simple(origin.addr(), "", "").start().await?;

    let tcp = connect(gateway.addr("web")).await?;
    let request = "ws://chat.example.com/socket".into_client_request()?;
    let (mut ws, response) = within(
        "the WebSocket handshake",
        WAIT,
        tokio_tungstenite::client_async(request, tcp),
    )
    .await??;
    assert_eq!(response.status(), 101);

    let seen = origin
        .last_request()
        .ok_or_else(|| anyhow::anyhow!("origin saw no request"))?;
    assert_eq!(
        seen.headers.get("upgrade").and_then(|v| v.to_str().ok()),
        Some("websocket")
    );
    assert_eq!(
        seen.headers.get("host").and_then(|v| v.to_str().ok()),
        Some("chat.example.com")
    );

    let big = vec![0xA5u8; 200_000];
    let messages = [
        Message::text("hello through sluice"),
        Message::binary(vec![0u8, 1, 2, 254, 255]),
        Message::text("second text"),
        Message::binary(big),
    ];
    for message in messages {
        within("sending a message", WAIT, ws.send(message.clone())).await??;
        let echoed = within("the echo", WAIT, ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the tunnel closed"))??;
        assert!(
            echoed == message,
            "echo differs: sent {} bytes, got {} bytes",
            message.len(),
            echoed.len()
        );
    }
    within("the close handshake", WAIT, ws.close(None)).await??;
    Ok(())
}
