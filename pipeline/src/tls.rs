//! A run's own TLS: `pipeline` makes a CA and a token per run (files of mode 0600 in the
//! run directory), and each stage, at its start, issues itself a certificate for the
//! address it serves on, signed with that CA. So hosts need not be known when the run is
//! planned (Slurm places them later), and clients still verify the very host they dial.
//! The CA key is as secret as the token: both stay in the run directory.

use crate::shards::atomic_write_mode;
use crate::stream::{file_err, StreamError};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::path::Path;

/// The files of a run's TLS directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const TOKEN: &str = "token";

/// The CA's name: fixed, so that a stage can rebuild the issuer from the key alone
/// (rcgen needs the issuer's name; parsing the certificate would need an X.509 parser).
const CA_NAME: &str = "saestream run CA";

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p
}

fn tls_err(m: impl std::fmt::Display) -> StreamError {
    StreamError::Other(format!("TLS: {m}"))
}

/// Makes `dir` (mode 0700) with a new CA (`ca.pem`, `ca.key`) and token (`token`);
/// files already there are kept (the user's own, or a resumed run's).
pub fn make_run_pki(dir: &Path) -> Result<(), StreamError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| file_err(dir, format!("cannot create: {e}")))?;
    if !dir.join(CA_CERT).is_file() || !dir.join(CA_KEY).is_file() {
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = ca_params().self_signed(&key).map_err(tls_err)?;
        atomic_write_mode(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        atomic_write_mode(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o600)?;
    }
    if !dir.join(TOKEN).is_file() {
        let mut b = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .map_err(|e| tls_err(format!("cannot read /dev/urandom: {e}")))?;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        atomic_write_mode(&dir.join(TOKEN), format!("{hex}\n").as_bytes(), 0o600)?;
    }
    Ok(())
}

/// A certificate and key (PEM) for `hosts` (names or IP addresses), signed by the run CA
/// whose key is in `ca_key` (a CA made by [`make_run_pki`]).
pub fn issue(ca_key: &Path, hosts: &[String]) -> Result<(Vec<u8>, Vec<u8>), StreamError> {
    let pem = std::fs::read_to_string(ca_key)
        .map_err(|e| file_err(ca_key, format!("cannot read the CA key: {e}")))?;
    let ca = KeyPair::from_pem(&pem)
        .map_err(|e| file_err(ca_key, format!("not a private key in PEM: {e}")))?;
    let issuer = Issuer::new(ca_params(), ca);
    let key = KeyPair::generate().map_err(tls_err)?;
    let mut p = CertificateParams::new(hosts.to_vec()).map_err(tls_err)?;
    p.distinguished_name.push(
        DnType::CommonName,
        hosts.first().cloned().unwrap_or_default(),
    );
    let cert = p.signed_by(&key, &issuer).map_err(tls_err)?;
    Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
}
