//! Frames, direct messages, channels, resume, takeover: the happy paths of
//! the contract, end to end over real sockets.

mod common;

use common::{Ended, Server, get_json, post_json};
use serde_json::{Value, json};

fn offset_of(v: &Value) -> String {
    v["offset"].as_str().expect("offset").to_string()
}

#[tokio::test]
async fn welcome_names_session_pod_and_heartbeat() {
    let server = Server::start(&["--heartbeat-s", "7"]).await;
    let (_client, welcome) = server.session("s1").await;
    assert_eq!(
        welcome,
        json!({"type":"welcome","session":"s1","pod":"pod-test","resumed":false,"gap":false,"heartbeat_s":7})
    );
    // Without ?session= a random one is assigned.
    let mut anon = server.connect("").await;
    let welcome = anon.recv_json().await;
    let session = welcome["session"].as_str().expect("session");
    assert!(
        session.starts_with("anon-") && session.len() > 10,
        "{session}"
    );
}

#[tokio::test]
async fn ping_echoes_id_and_data() {
    let server = Server::start(&[]).await;
    let (mut client, _) = server.session("s1").await;
    client
        .send_json(json!({"type":"ping","id":"x1","data":{"t":[1,2,3]}}))
        .await;
    assert_eq!(
        client.recv_json().await,
        json!({"type":"pong","id":"x1","data":{"t":[1,2,3]}})
    );
}

#[tokio::test]
async fn http_message_reaches_the_connected_session_with_its_offset() {
    let server = Server::start(&[]).await;
    let (mut client, _) = server.session("s1").await;
    let (status, body) = server.post_session("s1", json!({"hello": "world"})).await;
    assert_eq!(status, 202);
    let msg = client.recv_json().await;
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["data"], json!({"hello": "world"}));
    assert_eq!(msg["offset"], body["offset"]);
    assert!(
        msg.get("channel").is_none() && msg.get("from").is_none(),
        "{msg}"
    );
}

#[tokio::test]
async fn messages_sent_before_connecting_are_delivered_on_connect_in_order() {
    let server = Server::start(&[]).await;
    let mut offsets = Vec::new();
    for i in 0..5 {
        let (status, body) = server.post_session("later", json!(i)).await;
        assert_eq!(status, 202);
        offsets.push(offset_of(&body));
    }
    let (mut client, welcome) = server.session("later").await;
    assert_eq!(welcome["gap"], false);
    for (i, offset) in offsets.iter().enumerate() {
        let msg = client.recv_json().await;
        assert_eq!(msg["data"], json!(i));
        assert_eq!(&offset_of(&msg), offset);
    }
}

#[tokio::test]
async fn resume_with_last_delivers_exactly_what_came_after() {
    let server = Server::start(&[]).await;
    let (client, _) = server.session("r").await;
    client.close().await;
    let mut offsets = Vec::new();
    for i in 0..6 {
        offsets.push(offset_of(&server.post_session("r", json!(i)).await.1));
    }
    let (mut resumed, welcome) = server.session(&format!("r&last={}", offsets[2])).await;
    assert_eq!(welcome["resumed"], true);
    assert_eq!(welcome["gap"], false);
    for i in 3..6 {
        let msg = resumed.recv_json().await;
        assert_eq!(msg["data"], json!(i));
    }
    // Live messages follow the replay.
    server.post_session("r", json!("live")).await;
    assert_eq!(resumed.recv_json().await["data"], "live");
}

#[tokio::test]
async fn resume_past_retention_reports_a_gap() {
    let server = Server::start(&["--retention-messages", "3"]).await;
    let mut offsets = Vec::new();
    for i in 0..6 {
        offsets.push(offset_of(&server.post_session("g", json!(i)).await.1));
    }
    let (mut client, welcome) = server.session(&format!("g&last={}", offsets[0])).await;
    assert_eq!(welcome["gap"], true);
    for i in 3..6 {
        assert_eq!(client.recv_json().await["data"], json!(i));
    }
    // Asking from within what is retained: no gap.
    let (_c2, welcome) = server.session(&format!("g&last={}", offsets[3])).await;
    assert_eq!(welcome["gap"], false);
}

#[tokio::test]
async fn idempotency_key_returns_the_first_offset_and_delivers_once() {
    let server = Server::start(&[]).await;
    let (mut client, _) = server.session("i").await;
    let url = server.http("/v1/sessions/i/messages");
    let (s1, b1) = post_json(&url, json!({"data": "once"}), &[("Idempotency-Key", "k-1")]).await;
    let (s2, b2) = post_json(&url, json!({"data": "once"}), &[("Idempotency-Key", "k-1")]).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(b1["offset"], b2["offset"]);
    server.post_session("i", json!("next")).await;
    assert_eq!(client.recv_json().await["data"], "once");
    assert_eq!(
        client.recv_json().await["data"],
        "next",
        "the retry must not be delivered twice"
    );
}

#[tokio::test]
async fn send_frame_reaches_another_session_with_from() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = server.session("alice").await;
    let (mut bob, _) = server.session("bob").await;
    let ack = alice
        .request(
            json!({"type":"send","session":"bob","data":{"text":"hi"}}),
            1,
        )
        .await;
    assert_eq!(ack["type"], "ack");
    let msg = bob.recv_json().await;
    assert_eq!(msg["from"], "alice");
    assert_eq!(msg["data"], json!({"text":"hi"}));
    assert_eq!(msg["offset"], ack["offset"]);
}

#[tokio::test]
async fn channel_publish_reaches_every_subscriber_and_since_replays() {
    let server = Server::start(&[]).await;
    let (mut a, _) = server.session("a").await;
    let (mut b, _) = server.session("b").await;
    for c in [&mut a, &mut b] {
        let ack = c
            .request(json!({"type":"subscribe","channel":"room.1"}), 1)
            .await;
        assert_eq!(ack, json!({"type":"ack","id":1}));
    }
    let (status, body) = server.post_channel("room.1", json!("from-http")).await;
    assert_eq!(status, 202);
    let ack = a
        .request(
            json!({"type":"publish","channel":"room.1","data":"from-a"}),
            2,
        )
        .await;
    assert_eq!(ack["type"], "ack");
    for c in [&mut a, &mut b] {
        let first = c.recv_json().await;
        assert_eq!(first["channel"], "room.1");
        assert_eq!(first["data"], "from-http");
        assert_eq!(first["offset"], body["offset"]);
        assert_eq!(c.recv_json().await["data"], "from-a");
    }
    // A late subscriber asks for everything after the first message.
    let (mut late, _) = server.session("late").await;
    let since = body["offset"].as_str().expect("offset");
    let ack = late
        .request(
            json!({"type":"subscribe","channel":"room.1","since":since}),
            3,
        )
        .await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(late.recv_json().await["data"], "from-a");
    // Unsubscribed connections stop receiving.
    let ack = b
        .request(json!({"type":"unsubscribe","channel":"room.1"}), 4)
        .await;
    assert_eq!(ack["type"], "ack");
    server.post_channel("room.1", json!("after")).await;
    assert_eq!(a.recv_json().await["data"], "after");
    b.send_json(json!({"type":"ping","id":5})).await;
    assert_eq!(
        b.recv_json().await["type"],
        "pong",
        "nothing may reach b after unsubscribing"
    );
}

#[tokio::test]
async fn subscribe_without_since_gets_only_new_messages() {
    let server = Server::start(&[]).await;
    server.post_channel("news", json!("old")).await;
    let (mut c, _) = server.session("c").await;
    c.request(json!({"type":"subscribe","channel":"news"}), 1)
        .await;
    server.post_channel("news", json!("new")).await;
    assert_eq!(c.recv_json().await["data"], "new");
}

#[tokio::test]
async fn a_newer_connection_takes_over_and_the_older_gets_4409() {
    let server = Server::start(&[]).await;
    let (mut old, _) = server.session("dup").await;
    let (mut new, _) = server.session("dup").await;
    let (_, ended) = old.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(4409));
    server.post_session("dup", json!("to-new")).await;
    assert_eq!(new.recv_json().await["data"], "to-new");
}

#[tokio::test]
async fn session_info_delete_and_fleet() {
    let server = Server::start(&[]).await;
    let (mut client, _) = server.session("who").await;
    let (status, info) = get_json(&server.http("/v1/sessions/who")).await;
    assert_eq!(status, 200);
    assert_eq!(info["session"], "who");
    assert_eq!(info["connected"], true);
    assert_eq!(info["pod"], "pod-test");
    let connected_at = info["connected_at"].as_str().expect("connected_at");
    assert!(
        time::OffsetDateTime::parse(connected_at, &time::format_description::well_known::Rfc3339)
            .is_ok()
    );

    let (status, fleet) = get_json(&server.http("/v1/fleet")).await;
    assert_eq!(status, 200);
    assert_eq!(fleet["pods"][0]["pod"], "pod-test");
    assert_eq!(fleet["pods"][0]["connections"], 1);
    assert_eq!(fleet["pods"][0]["draining"], false);

    let resp = common::http()
        .delete(server.http("/v1/sessions/who"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    let (_, ended) = client.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(1000));
    common::eventually("session released", || async {
        get_json(&server.http("/v1/sessions/who")).await.0 == 404
    })
    .await;
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let server = Server::start(&[]).await;
    let (mut client, _) = server.session("m").await;
    client.assert_alive().await;
    server.post_session("m", json!(1)).await;
    client.recv_json().await;
    let text = server.metrics().await;
    assert_eq!(common::metric(&text, "wsfleet_connections"), 1.0, "{text}");
    assert_eq!(
        common::metric(&text, "wsfleet_connections_opened_total"),
        1.0
    );
    assert_eq!(
        common::metric(&text, "wsfleet_frames_in_total{type=\"ping\"}"),
        1.0
    );
    assert_eq!(
        common::metric(&text, "wsfleet_frames_out_total{type=\"pong\"}"),
        1.0
    );
    assert_eq!(
        common::metric(&text, "wsfleet_messages_accepted_total{kind=\"session\"}"),
        1.0
    );
    assert_eq!(
        common::metric(&text, "wsfleet_messages_delivered_total{kind=\"session\"}"),
        1.0
    );
    assert_eq!(
        common::metric(&text, "wsfleet_handshake_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        common::metric(
            &text,
            "wsfleet_delivery_latency_seconds_count{kind=\"session\"}"
        ),
        1.0
    );
    client.close().await;
    common::eventually("close counted", || async {
        common::metric(
            &server.metrics().await,
            "wsfleet_connections_closed_total{code=\"1000\"}",
        ) == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_subscribe_ack_with_since_says_whether_history_was_trimmed() {
    let server = Server::start(&["--retention-messages", "3"]).await;
    let mut offsets = Vec::new();
    for n in 0..6 {
        let (status, body) = server.post_channel("g", json!(n)).await;
        assert_eq!(status, 202);
        offsets.push(body["offset"].as_str().unwrap().to_string());
    }
    let (mut client, _) = server.session("gapper").await;
    // Since the first offset: messages 1 and 2 were trimmed (3 retained).
    let ack = client
        .request(
            json!({"type":"subscribe","channel":"g","since": offsets[0]}),
            1,
        )
        .await;
    assert_eq!(
        (ack["type"].clone(), ack["gap"].clone()),
        (json!("ack"), json!(true))
    );
    // Since the offset just before the oldest retained: nothing is missing.
    let (mut other, _) = server.session("complete").await;
    let ack = other
        .request(
            json!({"type":"subscribe","channel":"g","since": offsets[2]}),
            2,
        )
        .await;
    assert_eq!(ack["gap"], json!(false));
    let replayed: Vec<_> = [
        other.recv_json().await,
        other.recv_json().await,
        other.recv_json().await,
    ]
    .iter()
    .map(|m| m["data"].clone())
    .collect();
    assert_eq!(replayed, vec![json!(3), json!(4), json!(5)]);
    // Without since, the ack carries no gap field at all.
    let ack = other
        .request(json!({"type":"subscribe","channel":"h"}), 3)
        .await;
    assert!(ack.get("gap").is_none(), "{ack}");
}

/// The operator metrics of docs/metrics.md move with what they count: a
/// resume replays, bytes flow both ways, each delivery samples the queue,
/// a close records the lifetime, and the process metrics are exported.
#[tokio::test]
async fn operator_metrics_count_resumes_replays_bytes_depth_and_lifetimes() {
    let server = Server::start(&[]).await;
    let (client, _) = server.session("op").await;
    client.close().await;
    let first = offset_of(&server.post_session("op", json!("a")).await.1);
    server.post_session("op", json!("b")).await;
    server.post_session("op", json!("c")).await;
    let (mut resumed, welcome) = server.session(&format!("op&last={first}")).await;
    assert_eq!(welcome["resumed"], true);
    for _ in 0..2 {
        resumed.recv_json().await;
    }
    resumed.assert_alive().await;
    server.post_session("op", json!("live")).await;
    resumed.recv_json().await;
    let text = server.metrics().await;
    let m = |sample: &str| common::metric(&text, sample);
    assert_eq!(m("wsfleet_resumes_total"), 1.0, "{text}");
    assert_eq!(m("wsfleet_messages_replayed_total{kind=\"session\"}"), 2.0);
    // The live one went through the queue; replays do not.
    assert!(m("wsfleet_queue_depth_count") >= 1.0, "{text}");
    // At least the ping frame in, welcome + 3 messages + pong out.
    assert!(
        m("wsfleet_websocket_received_bytes_total") >= 10.0,
        "{text}"
    );
    assert!(m("wsfleet_websocket_sent_bytes_total") >= 100.0, "{text}");
    // The first connection closed; the resumed one is open.
    assert_eq!(m("wsfleet_connection_duration_seconds_count"), 1.0);
    // Whole CPU seconds: 0 this early, but exported.
    assert!(
        text.lines()
            .any(|l| l.starts_with("process_cpu_seconds_total ")),
        "{text}"
    );
    for process in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_threads",
    ] {
        assert!(m(process) > 0.0, "{process} missing or zero:\n{text}");
    }
    resumed.close().await;
    common::eventually("second lifetime recorded", || async {
        common::metric(
            &server.metrics().await,
            "wsfleet_connection_duration_seconds_count",
        ) == 2.0
    })
    .await;
}

/// `POST /v1/messages`: one result per message, in order; each message
/// accepted or refused on its own; a body that is no batch refused whole.
#[tokio::test]
async fn a_batch_answers_each_message_on_its_own_in_order() {
    let server = Server::start(&["--max-batch-messages", "5", "--max-batch-bytes", "4096"]).await;
    let (mut client, _) = server.session("b1").await;
    let url = server.http("/v1/messages");
    let (status, body) = common::post_json(
        &url,
        json!({"messages": [
            {"session": "b1", "data": "one"},
            {"session": "b1", "data": {"x": 2}},
            {"session": "b1", "data": "dup", "idempotency_key": "k"},
            {"channel": "no subscribers", "data": 1},
            {"session": "b1", "data": "dup", "idempotency_key": "k"},
        ]}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 5);
    assert_eq!(results[3]["error"]["code"], "bad_request", "{body}");
    assert!(
        results[3]["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("channel")
    );
    assert_eq!(
        results[4]["offset"], results[2]["offset"],
        "the idempotency key holds within a batch"
    );
    for (i, want) in [json!("one"), json!({"x": 2}), json!("dup")]
        .iter()
        .enumerate()
    {
        let m = client.recv_json().await;
        assert_eq!(&m["data"], want, "{m}");
        assert_eq!(m["offset"], results[i]["offset"]);
    }
    client.assert_alive().await;

    // Whole-body refusals: nothing stored, JSON error bodies.
    let six: Vec<_> = (0..6)
        .map(|i| json!({"session": "b1", "data": i}))
        .collect();
    let big = "x".repeat(5000);
    let cases = [
        (json!({"messages": six}), 413, "too_large"),
        (json!({"messages": []}), 400, "bad_request"),
        (json!({"message": []}), 400, "bad_request"),
        (
            json!({"messages": [{"session": "b1", "data": big}]}),
            413,
            "too_large",
        ),
    ];
    for (body, want_status, code) in cases {
        let (status, answer) = common::post_json(&url, body, &[]).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (want_status, Some(code)),
            "{answer}"
        );
    }
    client.assert_alive().await;
    let metrics = server.metrics().await;
    assert_eq!(
        common::metric(
            &metrics,
            "wsfleet_batch_messages_total{result=\"accepted\"}"
        ),
        4.0
    );
    assert_eq!(
        common::metric(&metrics, "wsfleet_batch_messages_total{result=\"refused\"}"),
        1.0
    );
}

/// The batch endpoint sits behind the same API key as the other `/v1/*` routes.
#[tokio::test]
async fn a_batch_needs_the_api_key_when_one_is_set() {
    let server = Server::start(&["--api-key", "batch-secret"]).await;
    let url = server.http("/v1/messages");
    let body = json!({"messages": [{"session": "k1", "data": 1}]});
    let (status, answer) = common::post_json(&url, body.clone(), &[]).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{answer}"
    );
    let (status, answer) =
        common::post_json(&url, body, &[("Authorization", "Bearer batch-secret")]).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["results"][0]["offset"].is_string(), "{answer}");
}
