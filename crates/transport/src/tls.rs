//! Mutual TLS 1.3 between cluster members (rustls, with ring). Every host holds a certificate
//! signed by the cluster's own CA (`livemig tls init`, rcgen); each side of a migration
//! accepts the other only with such a certificate. The CA is private to the cluster, so
//! membership is the identity: host names are not checked against the address dialled
//! (migrations dial addresses, not names), everything else a certificate says is.
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TlsError {
    /// reading {what} {path}: {source}
    Read {
        what: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    /// {path} holds no certificate
    NoCertificate { path: PathBuf },
    /// the cluster CA {path} is not usable: {why}
    Ca { path: PathBuf, why: String },
    /// the TLS configuration was refused: {0}
    Config(#[from] rustls::Error),
    /// the client verifier could not be built: {0}
    Verifier(String),
    /// creating certificates: {0}
    Generate(#[from] rcgen::Error),
    /// writing {path}: {source}
    Write { path: PathBuf, source: io::Error },
    /// host name {0:?} is not usable in a file name (letters, digits, '.', '-', '_' only)
    HostName(String),
}

/// Where a host's credentials are: its certificate, its key, the cluster CA.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Loaded credentials: client and server configurations for mutual TLS 1.3.
pub struct Tls {
    pub client: Arc<rustls::ClientConfig>,
    pub server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(mutual TLS 1.3)")
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let certs = CertificateDer::pem_file_iter(&files.cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Read {
                what: "certificate",
                path: files.cert.clone(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                path: files.cert.clone(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Read {
            what: "private key",
            path: files.key.clone(),
            source,
        })?;
        let roots = Arc::new(load_roots(&files.ca)?);
        let versions = &[&rustls::version::TLS13];
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(certs.clone(), key.clone_key())?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ClusterMember(server_verifier)))
            .with_client_auth_cert(certs, key)?;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what: "cluster CA",
            path: path.to_path_buf(),
            source,
        })?;
    for c in certs {
        roots.add(c).map_err(|e| TlsError::Ca {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// Accepts a server whose certificate chains to the cluster CA (validity, key usage and
/// signatures all checked by webpki), whatever name it was issued for.
#[derive(Debug)]
struct ClusterMember(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ClusterMember {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Creates a cluster CA (`DIR/ca.pem`, its key `DIR/ca.key`) and, for each host, a certificate
/// and key signed by it (`DIR/NAME.pem`, `DIR/NAME.key`), valid for 10 years. Keys are written
/// 0600. An existing CA in `DIR` is reused, so hosts can be added later.
pub fn init_cluster(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    for h in hosts {
        let ok = !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !ok {
            return Err(TlsError::HostName(h.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let (ca_pem, ca_key_pem) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca_key = match std::fs::read_to_string(&ca_key_pem) {
        Ok(pem) => KeyPair::from_pem(&pem)?,
        Err(_) => KeyPair::generate()?,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "livemig cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_after = rcgen::date_time_ymd(expiry_year(), 1, 1);
    let ca = ca_params.self_signed(&ca_key)?;
    let mut written = Vec::new();
    if !ca_pem.exists() {
        write(&ca_pem, &ca.pem(), 0o644)?;
        write(&ca_key_pem, &ca_key.serialize_pem(), 0o600)?;
        written.extend([ca_pem.clone(), ca_key_pem]);
    }
    // Signed with the CA's key under the CA's name: the chain verifies against the CA
    // certificate on disk, even one an earlier run wrote.
    let issuer = &ca;
    for h in hosts {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![h.clone()])?;
        p.distinguished_name.push(DnType::CommonName, h.as_str());
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_after = rcgen::date_time_ymd(expiry_year(), 1, 1);
        let cert = p.signed_by(&key, issuer, &ca_key)?;
        let (c, k) = (dir.join(format!("{h}.pem")), dir.join(format!("{h}.key")));
        write(&c, &cert.pem(), 0o644)?;
        write(&k, &key.serialize_pem(), 0o600)?;
        written.extend([c, k]);
    }
    Ok(written)
}

/// The year ten years from now: certificates expire on its first day.
fn expiry_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + i32::try_from(secs / 31_556_952).unwrap_or(56) + 10
}

/// Writes `text` to a new file created with `mode` (keys never exist with wider rights).
fn write(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}
