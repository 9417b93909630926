//! The relay's TLS identity as clients meet it: a certificate from a CA
//! (`--cert/--key`) verified by name, and the self-signed default pinned by
//! fingerprint. A wrong CA, a wrong name or a wrong pin is refused in the
//! handshake, before any request is sent.

use std::net::SocketAddr;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use securechat_client::relay::{
    parse_ca_pem, CertRejection, ClientError, RelayClient, ServerTrust,
};
use securechat_common::protocol::{Request, Response};
use securechat_relay::tls::TlsSource;
use securechat_testkit::relay::test_config;
use securechat_testkit::TestRelay;

struct Ca {
    pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let issuer =
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA");
    Ca {
        pem: issuer.pem(),
        issuer,
    }
}

/// A leaf certificate for `names`, signed by `ca`, written as PEM files.
fn leaf(ca: &Ca, names: &[&str], dir: &std::path::Path) -> TlsSource {
    let key = KeyPair::generate().expect("leaf key");
    let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("leaf params");
    let cert = params
        .signed_by(&key, &ca.issuer)
        .expect("signing the leaf");
    let cert_path = dir.join("relay.crt");
    let key_path = dir.join("relay.key");
    std::fs::write(&cert_path, cert.pem()).expect("writing cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("writing key");
    TlsSource::Files {
        cert: cert_path,
        key: key_path,
    }
}

async fn online(client: &RelayClient) -> Response {
    client.request(&Request::Online).await.expect("request")
}

async fn connect(
    addr: SocketAddr,
    name: &str,
    trust: ServerTrust,
) -> Result<RelayClient, ClientError> {
    RelayClient::connect_named(addr, name, trust).await
}

#[tokio::test]
async fn ca_signed_certificate_is_verified_by_name_and_issuer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let good_ca = ca("securechat test CA");
    let other_ca = ca("some other CA");
    let mut config = test_config(&tmp.path().join("data"), None);
    config.tls = leaf(
        &good_ca,
        &["relay.securechat.test", "localhost"],
        tmp.path(),
    );
    let relay = TestRelay::start(config).await.expect("relay");
    let good = parse_ca_pem(good_ca.pem.as_bytes()).expect("CA PEM");

    // The right CA and a name in the certificate: connected, and it answers.
    let client = connect(
        relay.addr(),
        "relay.securechat.test",
        ServerTrust::CaCert(good.clone()),
    )
    .await
    .expect("trusted CA and matching name");
    // Not logged in, so a typed refusal: the point is that the stream works.
    assert!(matches!(online(&client).await, Response::Error(_)));

    // A name the certificate does not carry: refused for that name, and the
    // error shows which names it does carry.
    let err = connect(relay.addr(), "elsewhere.example", ServerTrust::CaCert(good))
        .await
        .expect_err("wrong name must be refused");
    match &err {
        ClientError::CertificateRejected {
            addr,
            rejection:
                CertRejection::NameMismatch {
                    expected,
                    presented,
                },
        } => {
            assert_eq!(*addr, relay.addr());
            assert_eq!(expected, "elsewhere.example");
            assert!(
                presented
                    .iter()
                    .any(|n| n.contains("relay.securechat.test")),
                "{presented:?}"
            );
        }
        other => panic!("wanted a name mismatch, got {other:?}"),
    }

    // Another CA.
    let other = parse_ca_pem(other_ca.pem.as_bytes()).expect("CA PEM");
    let err = connect(
        relay.addr(),
        "relay.securechat.test",
        ServerTrust::CaCert(other),
    )
    .await
    .expect_err("unknown issuer must be refused");
    assert!(
        matches!(
            err,
            ClientError::CertificateRejected {
                rejection: CertRejection::UnknownIssuer,
                ..
            }
        ),
        "{err:?}"
    );

    // Pinning still works with a CA certificate: the pin is the leaf's hash.
    let pinned = connect(
        relay.addr(),
        "any-name",
        ServerTrust::Fingerprint(relay.fingerprint()),
    )
    .await
    .expect("pinned leaf");
    assert!(matches!(online(&pinned).await, Response::Error(_)));
    relay.stop().await.expect("stop");
}

#[tokio::test]
async fn self_signed_relay_refuses_a_wrong_pin() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let relay = TestRelay::start(test_config(tmp.path(), None))
        .await
        .expect("relay");
    let mut wrong = relay.fingerprint();
    wrong[0] ^= 1;
    let err = RelayClient::connect(relay.addr(), ServerTrust::Fingerprint(wrong))
        .await
        .expect_err("a wrong pin must be refused");
    // Typed, with both fingerprints, and shown to the user.
    match &err {
        ClientError::CertificateRejected {
            rejection:
                CertRejection::PinMismatch {
                    expected,
                    presented,
                },
            ..
        } => {
            assert_eq!(*expected, wrong);
            assert_eq!(*presented, relay.fingerprint());
        }
        other => panic!("wanted a pin mismatch, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("does not match the pinned"), "{text}");
    assert!(text.contains(&hex::encode(wrong)), "{text}");
    relay.connect().await.expect("the right pin still works");
    relay.stop().await.expect("stop");
}

#[tokio::test]
async fn unreachable_relay_is_not_a_certificate_refusal() {
    // A UDP port with nobody behind it: the handshake times out (or the
    // port is reported unreachable), which is not the certificate's fault.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("a free UDP port")
        .local_addr()
        .expect("its address");
    let err = RelayClient::connect(port, ServerTrust::Fingerprint([7; 32]))
        .await
        .expect_err("nobody answers there");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
}
