//! TLS termination: certificates loaded at config time, chosen per handshake by SNI.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::file::TlsCertFile;

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
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
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
    certified.keys_match().map_err(|e| {
        (
            "key",
            format!(
                "private key \"{}\" does not belong to certificate \"{}\": {e}",
                key_path.display(),
                cert_path.display()
            ),
        )
    })?;
    Ok(certified)
}
