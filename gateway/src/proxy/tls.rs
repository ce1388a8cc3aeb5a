//! TLS termination: certificates loaded at config time, chosen per handshake by SNI.
//!
//! What a listener speaks is spelled out here rather than taken from
//! rustls' defaults, so that a dependency update cannot widen it: TLS 1.3
//! and 1.2 only, every suite an AEAD with an ephemeral (EC)DHE key exchange
//! (forward secrecy), over X25519, P-256 or P-384. A client that offers
//! nothing better (TLS 1.1 or older, CBC or static-RSA suites only) is
//! refused in the handshake with a `protocol_version` or `handshake_failure`
//! alert.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::SupportedCipherSuite;
use rustls::crypto::{CryptoProvider, SupportedKxGroup, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::version::{TLS12, TLS13};

use crate::config::file::TlsCertFile;

/// The protocol versions a TLS listener accepts.
static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&TLS13, &TLS12];

/// The cipher suites a TLS listener accepts: TLS 1.3's three, then TLS
/// 1.2's ECDHE with AES-GCM or ChaCha20-Poly1305, for ECDSA and RSA
/// certificates. All are strong, so the client's order of preference wins
/// (as Mozilla's guidelines advise): one without AES hardware picks ChaCha20.
static CIPHER_SUITES: &[SupportedCipherSuite] = &[
    ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ring::cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// The key exchange groups a TLS listener accepts.
static KX_GROUPS: &[&dyn SupportedKxGroup] = &[
    ring::kx_group::X25519,
    ring::kx_group::SECP256R1,
    ring::kx_group::SECP384R1,
];

/// The ring provider limited to [`CIPHER_SUITES`] and [`KX_GROUPS`].
fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        kx_groups: KX_GROUPS.to_vec(),
        ..ring::default_provider()
    }
}

/// Picks a certificate by the client's SNI: exact names first, then the
/// longest matching `*.suffix`, then the listener's first certificate.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `(".example.com", key)`, longest suffix first.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        self.wildcard
            .iter()
            .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix.as_str()))
            .map(|(_, key)| key.clone())
            .or_else(|| Some(self.default.clone()))
    }
}

/// Builds a listener's TLS config. On error returns the key path below
/// `tls` (like `[1].key`) and what is wrong.
pub(crate) fn server_config(
    certs: &[TlsCertFile],
    base: &Path,
) -> Result<rustls::ServerConfig, (String, String)> {
    let mut exact = HashMap::new();
    let mut wildcard = Vec::new();
    let mut default = None;
    if certs.is_empty() {
        return Err((String::new(), "at least one certificate is required".into()));
    }
    for (i, file) in certs.iter().enumerate() {
        let key = load_certified_key(file, base)
            .map_err(|(field, msg)| (format!("[{i}].{field}"), msg))?;
        let key = Arc::new(key);
        match (&file.sni, i) {
            (None, 0) => {}
            (None, _) => {
                return Err((
                    format!("[{i}].sni"),
                    "every certificate but the first (the default) needs `sni` names".into(),
                ));
            }
            (Some(names), _) => {
                for name in names {
                    let name = name.to_ascii_lowercase();
                    if let Some(suffix) = name.strip_prefix("*.") {
                        wildcard.push((format!(".{suffix}"), key.clone()));
                    } else if exact.insert(name.clone(), key.clone()).is_some() {
                        return Err((
                            format!("[{i}].sni"),
                            format!("name \"{name}\" is given to two certificates"),
                        ));
                    }
                }
            }
        }
        default.get_or_insert(key);
    }
    wildcard.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
    let Some(default) = default else {
        return Err((String::new(), "at least one certificate is required".into()));
    };
    let resolver = SniResolver {
        exact,
        wildcard,
        default,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| (String::new(), format!("TLS setup failed: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn load_certified_key(
    file: &TlsCertFile,
    base: &Path,
) -> Result<CertifiedKey, (&'static str, String)> {
    let cert_path = base.join(&file.cert);
    let key_path = base.join(&file.key);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|iter| iter.collect())
        .map_err(|e| {
            (
                "cert",
                format!("cannot read certificate \"{}\": {e}", cert_path.display()),
            )
        })?;
    if chain.is_empty() {
        return Err((
            "cert",
            format!("no PEM certificate found in \"{}\"", cert_path.display()),
        ));
    }
    let private = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        (
            "key",
            format!("cannot read private key \"{}\": {e}", key_path.display()),
        )
    })?;
    let signing = ring::sign::any_supported_type(&private).map_err(|e| {
        (
            "key",
            format!("unsupported private key \"{}\": {e}", key_path.display()),
        )
    })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        // The certificate itself could not be parsed: it is what is wrong.
        Err(rustls::Error::InvalidCertificate(e)) => Err((
            "cert",
            format!(
                "certificate \"{}\" is not a valid X.509 certificate: {e}",
                cert_path.display()
            ),
        )),
        Err(e) => Err((
            "key",
            format!(
                "private key \"{}\" does not belong to certificate \"{}\": {e}",
                key_path.display(),
                cert_path.display()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::KeyExchangeAlgorithm;
    use rustls::{CipherSuite, ProtocolVersion};

    #[test]
    fn only_tls12_and_tls13_with_ecdhe_and_aead_suites() {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .expect("the suites fit the versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        let versions: Vec<ProtocolVersion> = PROTOCOL_VERSIONS.iter().map(|v| v.version).collect();
        assert_eq!(
            versions,
            [ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2]
        );
        let suites = &config.crypto_provider().cipher_suites;
        assert_eq!(suites.len(), 9);
        for suite in suites {
            let name = format!("{:?}", suite.suite());
            assert!(
                name.ends_with("_GCM_SHA256")
                    || name.ends_with("_GCM_SHA384")
                    || name.ends_with("_CHACHA20_POLY1305_SHA256"),
                "{name} is not an AEAD suite"
            );
            if let SupportedCipherSuite::Tls12(tls12) = suite {
                assert!(
                    matches!(tls12.kx, KeyExchangeAlgorithm::ECDHE),
                    "{name} has no ephemeral key exchange"
                );
                assert!(name.starts_with("TLS_ECDHE_"), "{name}");
            }
        }
        assert!(
            !suites
                .iter()
                .any(|s| s.suite() == CipherSuite::TLS_RSA_WITH_AES_128_CBC_SHA),
            "no CBC suite"
        );
        let groups: Vec<String> = config
            .crypto_provider()
            .kx_groups
            .iter()
            .map(|g| format!("{:?}", g.name()))
            .collect();
        assert_eq!(groups, ["X25519", "secp256r1", "secp384r1"]);
    }
}
