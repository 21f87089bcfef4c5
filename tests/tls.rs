//! TLS and mutual TLS on the real server's gRPC listener, with certificates made here (rcgen):
//! a client trusting the CA gets Routes, a plaintext client gets nothing; with a client CA
//! only clients holding a certificate it signed get in; a certificate replaced on disk serves
//! new connections without a restart; unusable files stop start-up with the file named.
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Server;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tiergate::proto::{self, route_request::Input, router_client::RouterClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(p, key),
    }
}

/// A leaf certificate and its key (PEM) for `names`, signed by `ca`.
fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Writes through a rename, as a Secret update or cert-manager does.
fn put(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    config: PathBuf,
}

/// Server files and a config using them; `extra` is more of the `[tls]` table.
fn files(server: &(String, String), client_ca: Option<&Ca>, extra: &str) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    put(&cert, &server.0);
    put(&key, &server.1);
    let mut tls = format!(
        "\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    if let Some(ca) = client_ca {
        let p = dir.path().join("client-ca.crt");
        put(&p, &ca.pem);
        tls.push_str(&format!("client_ca_file = {:?}\n", p.display().to_string()));
    }
    tls.push_str(extra);
    let config = dir.path().join("tiergate.toml");
    std::fs::write(
        &config,
        format!("{}{tls}", tiergate::config::EMBEDDED_DEFAULT),
    )
    .unwrap();
    Files {
        _dir: dir,
        cert,
        key,
        config,
    }
}

fn serve(f: &Files) -> Server {
    Server::spawn(&["--config", f.config.to_str().unwrap()])
}

/// A TLS channel trusting `ca`, presenting `identity` when given. Errors (a refused
/// handshake) come back rather than panic.
async fn channel(
    addr: &str,
    ca: &Ca,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

fn route_request() -> proto::RouteRequest {
    proto::RouteRequest {
        input: Some(Input::Prompt(
            "Explain the proof of Fermat's little theorem.".into(),
        )),
        ..Default::default()
    }
}

/// A Route over a new connection: Ok with the chosen model, or why not (connect or RPC).
async fn route(addr: &str, ca: &Ca, identity: Option<&(String, String)>) -> Result<String, String> {
    let ch = channel(addr, ca, identity)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    RouterClient::new(ch)
        .route(route_request())
        .await
        .map(|r| r.into_inner().model)
        .map_err(|s| format!("route: {s:?}"))
}

/// Waits, over TLS, until the server says SERVING.
async fn ready(addr: &str, ca: &Ca, identity: Option<&(String, String)>) {
    let t0 = Instant::now();
    loop {
        if let Ok(ch) = channel(addr, ca, identity).await {
            let r = HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: "tiergate.v1.Router".into(),
                })
                .await;
            if r.is_ok_and(|r| r.into_inner().status == 1) {
                return;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "never SERVING over TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_trusting_clients_refuses_plaintext_and_picks_up_a_rotation() {
    let (ca1, ca2) = (ca("tiergate test CA 1"), ca("tiergate test CA 2"));
    let f = files(&leaf(&ca1, &["localhost", "127.0.0.1"]), None, "");
    let log = f.config.with_file_name("server.log");
    let s = Server::spawn_logged(
        &["--config", f.config.to_str().unwrap()],
        &[],
        std::fs::File::create(&log).unwrap(),
    );
    ready(&s.addr, &ca1, None).await;

    let model = route(&s.addr, &ca1, None).await.expect("TLS Route");
    assert!(!model.is_empty());

    // Plaintext HTTP/2 to the TLS port: no handshake, no answer.
    let plain = match RouterClient::connect(format!("http://{}", s.addr)).await {
        Ok(mut c) => c
            .route(route_request())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(plain.is_err(), "a plaintext client got an answer");

    // A client that trusts only CA 2 is refused until the server's files are replaced by a
    // certificate CA 2 signed; then, with no restart, it gets in and CA 1's clients do not.
    assert!(route(&s.addr, &ca2, None).await.is_err());
    // A broken rotation (a key that is not PEM) is reported and the old pair kept serving.
    let good_key = std::fs::read_to_string(&f.key).unwrap();
    put(&f.key, "-----BEGIN PRIVATE KEY-----\ntruncated\n");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("do not load; serving the previous certificate")
    {
        route(&s.addr, &ca1, None)
            .await
            .expect("the old certificate serves while the new files are broken");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the broken rotation was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    route(&s.addr, &ca1, None)
        .await
        .expect("still the old certificate");
    put(&f.key, &good_key);
    let next = leaf(&ca2, &["localhost", "127.0.0.1"]);
    put(&f.cert, &next.0);
    put(&f.key, &next.1);
    let t0 = Instant::now();
    loop {
        if route(&s.addr, &ca2, None).await.is_ok() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        route(&s.addr, &ca1, None).await.is_err(),
        "the old certificate is still served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_lets_in_only_clients_the_client_ca_signed() {
    let (server_ca, client_ca, stranger_ca) = (
        ca("tiergate server CA"),
        ca("tiergate client CA"),
        ca("someone else's CA"),
    );
    let probe = format!("127.0.0.1:{}", common::free_port());
    let f = files(
        &leaf(&server_ca, &["localhost"]),
        Some(&client_ca),
        &format!("plaintext_health_listen = {probe:?}\n"),
    );
    let s = serve(&f);
    let member = leaf(&client_ca, &["gateway.example"]);
    ready(&s.addr, &server_ca, Some(&member)).await;

    // What a kubelet's gRPC probe can do: plaintext, no certificate, health only.
    let plain = Channel::from_shared(format!("http://{probe}"))
        .unwrap()
        .connect()
        .await
        .expect("plaintext health port");
    let st = HealthClient::new(plain.clone())
        .check(HealthCheckRequest {
            service: "tiergate.v1.Router".into(),
        })
        .await
        .expect("health over plaintext")
        .into_inner()
        .status;
    assert_eq!(st, 1, "SERVING");
    let e = RouterClient::new(plain)
        .route(route_request())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");

    assert!(route(&s.addr, &server_ca, Some(&member)).await.is_ok());
    // `tiergate call` over mutual TLS.
    let dir = f.config.parent().unwrap();
    let pem = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (ca_pem, cert, key) = (
        pem("server-ca.pem", &server_ca.pem),
        pem("client.crt", &member.0),
        pem("client.key", &member.1),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["call", "--addr", &format!("https://{}", s.addr)])
        .arg("--ca-file")
        .arg(&ca_pem)
        .arg("--cert-file")
        .arg(&cert)
        .arg("--key-file")
        .arg(&key)
        .args(["--domain-name", "localhost", "health"])
        .output()
        .expect("tiergate call");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("SERVING"),
        "{out:?}"
    );
    let none = route(&s.addr, &server_ca, None).await;
    assert!(none.is_err(), "a client without a certificate got in");
    let stranger = leaf(&stranger_ca, &["gateway.example"]);
    let other = route(&s.addr, &server_ca, Some(&stranger)).await;
    assert!(other.is_err(), "a certificate from another CA got in");
}

#[test]
fn unusable_tls_files_stop_start_up_naming_the_file() {
    let ca = ca("tiergate test CA");
    let good = leaf(&ca, &["localhost"]);
    let other = leaf(&ca, &["localhost"]);

    let f = files(&good, None, "");
    std::fs::remove_file(&f.cert).unwrap();
    let err = common::serve_refused(&f.config);
    assert!(err.contains("tls.cert_file"), "{err}");

    let f = files(&good, None, "");
    put(&f.cert, "not a certificate\n");
    let err = common::serve_refused(&f.config);
    assert!(err.contains("no `BEGIN CERTIFICATE` block"), "{err}");

    let f = files(&(good.0.clone(), other.1.clone()), None, "");
    let err = common::serve_refused(&f.config);
    assert!(err.contains("does not fit"), "{err}");

    let f = files(&good, None, "");
    put(&f.key, &good.0);
    let err = common::serve_refused(&f.config);
    assert!(err.contains("tls.key_file"), "{err}");
}
