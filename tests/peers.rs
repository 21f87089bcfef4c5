//! Verify with peer answers, on the real server: final answers are compared (a pick, a declared
//! number), the reply counts them, and agreement ships an answer only below a bar the request
//! sets (`peer_threshold`); bad peers are refused with INVALID_ARGUMENT.
mod common;

use tiergate::proto;

const PROMPT: &str = "Which gas do plants take in for photosynthesis?\nA) Oxygen\nB) Carbon dioxide\nC) Nitrogen\nD) Helium\nAnswer:";

fn peer(answer: &str) -> proto::PeerAnswer {
    proto::PeerAnswer {
        model: "some-peer".into(),
        answer: answer.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_compared_and_agreement_ships_only_when_asked() {
    let server = common::Server::spawn(&[]);
    server.ready().await;
    let mut c = server.client().await;
    let info = server.info().await;
    let model = info.catalog.first().expect("a catalog").model.clone();
    let verify =
        |peers: Vec<proto::PeerAnswer>, peer_threshold: Option<f64>| proto::VerifyRequest {
            prompt: PROMPT.into(),
            answer: "Plants absorb it from the air. The answer is (B).".into(),
            model: model.clone(),
            // A floor nothing reaches, so that only agreement can ship.
            policy: Some(proto::Policy {
                quality_floor: Some(1.0),
                ..Default::default()
            }),
            peers,
            peer_threshold,
            ..Default::default()
        };
    let escalate = proto::Decision::Escalate as i32;
    let ship = proto::Decision::Ship as i32;

    let alone = c
        .verify(verify(vec![], None))
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(alone.decision, escalate, "{alone:?}");
    assert_eq!((alone.peers_compared, alone.peers_agreeing), (0, 0));

    // Agreement is reported but changes nothing unless a bar is given.
    let told = c
        .verify(verify(vec![peer("B"), peer("I am not sure.")], None))
        .await
        .expect("verify")
        .into_inner();
    assert_eq!((told.peers_compared, told.peers_agreeing), (1, 1));
    assert_eq!(told.decision, escalate);
    assert!(
        (told.p_pass - alone.p_pass).abs() < 1e-9,
        "peers never move p_pass"
    );

    let agreed = c
        .verify(verify(vec![peer("(B) carbon dioxide")], Some(0.0)))
        .await
        .expect("verify")
        .into_inner();
    assert_eq!((agreed.peers_compared, agreed.peers_agreeing), (1, 1));
    assert_eq!(agreed.decision, ship, "{agreed:?}");
    assert!(agreed.escalate_to.is_empty());

    let above = c
        .verify(verify(vec![peer("B")], Some(alone.p_pass + 0.01)))
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(above.decision, escalate, "the bar is above p_pass");

    let disagreed = c
        .verify(verify(
            vec![peer("The answer is (A)."), peer("C")],
            Some(0.0),
        ))
        .await
        .expect("verify")
        .into_inner();
    assert_eq!((disagreed.peers_compared, disagreed.peers_agreeing), (2, 0));
    assert_eq!(disagreed.decision, escalate);

    for bad in [
        verify((0..9).map(|_| peer("B")).collect(), None),
        verify(vec![peer("B")], Some(1.5)),
        verify(
            vec![proto::PeerAnswer {
                model: "m".repeat(300),
                answer: "B".into(),
            }],
            None,
        ),
    ] {
        let e = c.verify(bad).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().len() < 200, "short message: {}", e.message());
    }
}
