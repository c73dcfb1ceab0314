//! TLS of the connections: libpq's `sslmode` and `sslrootcert` URL parameters, and the rustls
//! client they make (feature `postgres-tls`, rustls with the `ring` provider, through
//! `tokio-postgres-rustls`).
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default) | when the server offers TLS, else plaintext | only with `sslrootcert` (chain) |
//! | `require` | always | only with `sslrootcert` (chain, as libpq's `verify-ca`) |
//! | `verify-ca` | always | chain, against `sslrootcert` or the system's roots |
//! | `verify-full` | always | chain and host name, against `sslrootcert` or the system's roots |
//!
//! `sslrootcert=PATH` is a PEM file of CA certificates; `sslrootcert=system` (libpq 16) the
//! system's roots, and then only `verify-full` is allowed (the default when it is given). Two
//! differences from libpq: without `sslrootcert`, `verify-ca`/`verify-full` use the system's
//! roots (libpq reads `~/.postgresql/root.crt`), and `prefer`/`require` never read a default
//! root file. A chain is checked against the roots only: no revocation lists (`sslcrl`) and
//! no client certificates (`sslcert`, `sslkey`, refused as unknown parameters).
//!
//! Without the feature, `disable` and `prefer` connect in plaintext (as a libpq built without
//! SSL does) and anything that asks for TLS (`require`, `verify-*`, `sslrootcert`) is
//! refused at open with [`StorageError::FeatureDisabled`], never a plaintext connection.
//!
//! tokio-postgres knows neither `verify-*` nor `sslrootcert`: both are taken out of a URL's
//! query here before it sees it, and it is told the mode to negotiate. A `key=value`
//! connection string (`host=… sslmode=require`) is left to tokio-postgres, so there only
//! `disable`, `prefer` and `require` (without certificate checks) are understood.

use std::path::PathBuf;

use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres::{Client, NoTls};

use crate::error::{Result, StorageError};

/// What `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where the trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RootCert {
    /// `sslrootcert=system`.
    System,
    /// `sslrootcert=PATH`: a PEM file.
    File(PathBuf),
}

/// The TLS parameters of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TlsParams {
    pub(super) mode: SslMode,
    pub(super) root_cert: Option<RootCert>,
}

impl TlsParams {
    /// Whether the connection must be encrypted.
    #[cfg(not(feature = "postgres-tls"))]
    fn requires_tls(&self) -> bool {
        matches!(
            self.mode,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// The mode tokio-postgres negotiates with (it checks no certificate itself).
    pub(super) fn wire_mode(&self) -> WireMode {
        match self.mode {
            SslMode::Disable => WireMode::Disable,
            SslMode::Prefer => WireMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => WireMode::Require,
        }
    }

    /// `sslmode=… sslrootcert=…` for messages (a path is no secret).
    fn describe(&self) -> String {
        let mode = match self.mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        };
        match &self.root_cert {
            None => format!("sslmode={mode}"),
            Some(RootCert::System) => format!("sslmode={mode} sslrootcert=system"),
            Some(RootCert::File(path)) => {
                format!("sslmode={mode} sslrootcert={}", path.display())
            }
        }
    }
}

/// Takes `sslmode` and `sslrootcert` out of the query of the URL `url` (tokio-postgres
/// refuses `verify-*` and `sslrootcert`), and returns the URL to hand to tokio-postgres and
/// what was taken. A `key=value` connection string is returned as it is: tokio-postgres
/// parses its `sslmode=disable|prefer|require`, which [`params`] reads back.
pub(super) fn split_url(
    url: &str,
    address: &str,
) -> Result<(String, Option<SslMode>, Option<RootCert>)> {
    if !url.contains("://") {
        return Ok((url.to_owned(), None, None));
    }
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let Some((base, query)) = before_fragment.split_once('?') else {
        return Ok((url.to_owned(), None, None));
    };
    let mut mode = None;
    let mut root_cert = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = crate::config::percent_decode(value);
        match name {
            "sslmode" => match value.as_str() {
                "disable" => mode = Some(SslMode::Disable),
                "prefer" => mode = Some(SslMode::Prefer),
                "require" => mode = Some(SslMode::Require),
                "verify-ca" => mode = Some(SslMode::VerifyCa),
                "verify-full" => mode = Some(SslMode::VerifyFull),
                other => {
                    return Err(StorageError::Config(format!(
                        "{address:?}: sslmode={other:?} is not one of disable, prefer, require, \
                         verify-ca, verify-full"
                    )));
                }
            },
            "sslrootcert" if value.is_empty() => {
                return Err(StorageError::Config(format!(
                    "{address:?}: sslrootcert is empty: give a PEM file of CA certificates or \
                     `system`"
                )));
            }
            "sslrootcert" if value == "system" => root_cert = Some(RootCert::System),
            "sslrootcert" => root_cert = Some(RootCert::File(PathBuf::from(value))),
            _ => kept.push(pair),
        }
    }
    let out = crate::config::join_url(base, &kept, fragment);
    Ok((out, mode, root_cert))
}

/// The TLS parameters: the mode [`split_url`] took out, else the one tokio-postgres parsed;
/// `sslrootcert=system` alone means `verify-full`, and allows nothing weaker (as libpq).
pub(super) fn params(
    taken: Option<SslMode>,
    parsed: WireMode,
    root_cert: Option<RootCert>,
    address: &str,
) -> Result<TlsParams> {
    let explicit = taken.is_some() || parsed != WireMode::Prefer;
    let mode = taken.unwrap_or(match parsed {
        WireMode::Disable => SslMode::Disable,
        WireMode::Require => SslMode::Require,
        _ => SslMode::Prefer,
    });
    let mode = match (&root_cert, mode) {
        (Some(RootCert::System), SslMode::Prefer) if !explicit => SslMode::VerifyFull,
        (Some(RootCert::System), SslMode::VerifyFull) => SslMode::VerifyFull,
        (Some(RootCert::System), _) => {
            return Err(StorageError::Config(format!(
                "{address:?}: sslrootcert=system needs sslmode=verify-full (as in libpq): the \
                 system's roots would trust any certificate they sign for any host"
            )));
        }
        (_, mode) => mode,
    };
    Ok(TlsParams { mode, root_cert })
}

/// Makes connections: in plaintext, or through rustls.
#[derive(Clone)]
pub(super) enum Connector {
    Plain,
    #[cfg(feature = "postgres-tls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Connector {
    /// The connector `params` ask for. Reads the root certificates now, so a missing or bad
    /// file is a [`StorageError::Config`] at open, not a failure of every connection.
    pub(super) fn new(params: &TlsParams, address: &str) -> Result<Self> {
        if params.mode == SslMode::Disable {
            return Ok(Self::Plain);
        }
        #[cfg(not(feature = "postgres-tls"))]
        {
            if params.requires_tls() || params.root_cert.is_some() {
                return Err(StorageError::FeatureDisabled {
                    feature: "postgres-tls",
                    what: format!("TLS ({}) in {address:?}", params.describe()),
                });
            }
            Ok(Self::Plain)
        }
        #[cfg(feature = "postgres-tls")]
        {
            rustls_client::connector(params, address).map(Self::Rustls)
        }
    }

    /// Connects with `config` and spawns the connection's task on the current runtime.
    pub(super) async fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> std::result::Result<Client, tokio_postgres::Error> {
        match self {
            Self::Plain => {
                let (client, connection) = config.connect(NoTls).await?;
                // Polled whenever a call drives this runtime (`block_on`), on the caller's thread.
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(client)
            }
            #[cfg(feature = "postgres-tls")]
            Self::Rustls(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(client)
            }
        }
    }
}

/// Why a connection failed, in words: a certificate the client refused says so, with where
/// the trusted roots came from.
pub(super) fn explain(e: &tokio_postgres::Error, params: &TlsParams) -> String {
    #[cfg(feature = "postgres-tls")]
    if let Some(why) = rustls_client::untrusted(e) {
        let roots = match &params.root_cert {
            None => " (the system's roots)",
            Some(_) => "",
        };
        return format!(
            "{e}: the server's certificate was not trusted ({why}) under {}{roots}: it is not \
             signed by that CA or not valid for this host name",
            params.describe()
        );
    }
    let _ = params;
    e.to_string()
}

#[cfg(feature = "postgres-tls")]
mod rustls_client {
    //! The rustls configuration of each mode.

    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
    use tokio_postgres_rustls::MakeRustlsConnect;

    use super::{RootCert, SslMode, TlsParams};
    use crate::error::{Result, StorageError};

    pub(super) fn connector(params: &TlsParams, address: &str) -> Result<MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| StorageError::Config(format!("TLS for {address:?}: {e}")))?;
        let roots = match (&params.root_cert, params.mode) {
            (Some(root), _) => Some(load_roots(root, address)?),
            (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
                Some(load_roots(&RootCert::System, address)?)
            }
            (None, _) => None,
        };
        let config = match (params.mode, roots) {
            // The provider's WebPKI verifier: chain, validity and host name.
            (SslMode::VerifyFull, Some(roots)) => {
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (_, roots) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly {
                    roots: roots.map(Arc::new),
                    provider,
                }))
                .with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }

    /// The CA certificates of `root`; none is a [`StorageError::Config`].
    fn load_roots(root: &RootCert, address: &str) -> Result<RootCertStore> {
        let mut store = RootCertStore::empty();
        match root {
            RootCert::System => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err(StorageError::Config(format!(
                        "TLS for {address:?}: no CA certificate found among the system's roots \
                         ({} errors); give one with sslrootcert=PATH",
                        found.errors.len()
                    )));
                }
            }
            RootCert::File(path) => {
                let shown = path.display();
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                    .map_err(|e| {
                        StorageError::Config(format!(
                            "TLS for {address:?}: cannot read sslrootcert={shown}: {e}"
                        ))
                    })?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(StorageError::Config(format!(
                        "TLS for {address:?}: sslrootcert={shown} holds no usable PEM CA \
                         certificate"
                    )));
                }
            }
        }
        Ok(store)
    }

    /// `prefer`, `require` and `verify-ca`: the handshake's signatures are checked (the
    /// session is encrypted to whoever holds the certificate's key), and the certificate's
    /// chain against `roots` when there are roots; the host name never.
    #[derive(Debug)]
    struct ChainOnly {
        roots: Option<Arc<RootCertStore>>,
        provider: Arc<CryptoProvider>,
    }

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            now: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            if let Some(roots) = &self.roots {
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    roots,
                    intermediates,
                    now,
                    self.provider.signature_verification_algorithms.all,
                )?;
            }
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// The certificate error of a failed handshake, if that was the failure.
    pub(super) fn untrusted(e: &tokio_postgres::Error) -> Option<String> {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(error) = source {
            if let Some(rustls::Error::InvalidCertificate(why)) = error.downcast_ref() {
                return Some(format!("{why:?}"));
            }
            if let Some(io) = error.downcast_ref::<std::io::Error>()
                && let Some(rustls::Error::InvalidCertificate(why)) =
                    io.get_ref().and_then(|inner| inner.downcast_ref())
            {
                return Some(format!("{why:?}"));
            }
            source = error.source();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<(String, TlsParams)> {
        let (rest, taken, root) = split_url(url, "<url>")?;
        let config: tokio_postgres::Config = rest.parse().unwrap();
        Ok((rest, params(taken, config.get_ssl_mode(), root, "<url>")?))
    }

    #[test]
    fn the_libpq_parameters_are_read_and_taken_out_of_the_url() {
        let (rest, p) =
            parse("postgres://u:pw@h/db?sslmode=verify-full&sslrootcert=/etc/ca%20x.pem&port=1")
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rest, "postgres://u:pw@h/db?port=1");
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(p.root_cert, Some(RootCert::File("/etc/ca x.pem".into())));

        let (rest, p) = parse("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(p.wire_mode(), WireMode::Require);
        assert_eq!((p.mode, p.root_cert), (SslMode::Require, None));

        let (_, p) = parse("postgres://h/db").unwrap();
        assert_eq!(p.mode, SslMode::Prefer);
        let (_, p) = parse("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(p.mode, SslMode::Disable);
        let (rest, p) = parse("postgres://h/db?sslmode=verify-ca").unwrap();
        assert_eq!(
            (rest.as_str(), p.mode),
            ("postgres://h/db", SslMode::VerifyCa)
        );
        assert_eq!(p.wire_mode(), WireMode::Require);
        // A `key=value` string: tokio-postgres reads the mode.
        let (_, p) = parse("host=h dbname=db sslmode=require").unwrap();
        assert_eq!(p.mode, SslMode::Require);

        // sslrootcert=system means verify-full, and nothing weaker.
        let (_, p) = parse("postgres://h/db?sslrootcert=system").unwrap();
        assert_eq!(
            (p.mode, p.root_cert),
            (SslMode::VerifyFull, Some(RootCert::System))
        );
        for weaker in ["require", "verify-ca", "prefer"] {
            let err = parse(&format!(
                "postgres://h/db?sslrootcert=system&sslmode={weaker}"
            ))
            .unwrap_err();
            assert!(matches!(err, StorageError::Config(_)), "{err}");
        }
        for bad in ["sslmode=verify", "sslmode=", "sslrootcert="] {
            let err = parse(&format!("postgres://h/db?{bad}")).unwrap_err();
            assert!(matches!(err, StorageError::Config(_)), "{bad}: {err}");
        }
    }

    /// Without the feature, a URL that asks for TLS is refused at open, before any
    /// connection, with an error naming the feature; `prefer` and `disable` stay plaintext.
    #[cfg(not(feature = "postgres-tls"))]
    #[test]
    fn without_the_feature_tls_is_refused_never_plaintext() {
        use crate::backend::{PostgresBackend, PostgresOptions};
        for query in [
            "sslmode=require",
            "sslmode=verify-ca",
            "sslmode=verify-full",
            "sslrootcert=/tmp/ca.pem",
            "sslrootcert=system",
        ] {
            // Nothing listens on port 1: an attempt to connect would be Unavailable instead.
            let url = format!("postgres://u:hunter2@127.0.0.1:1/db?{query}");
            let err = PostgresBackend::open(&url, "ns", &PostgresOptions::default()).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(
                    err,
                    StorageError::FeatureDisabled {
                        feature: "postgres-tls",
                        ..
                    }
                ),
                "{query}: {message}"
            );
            assert!(message.contains("postgres-tls"), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
        // A `key=value` string too.
        let err = PostgresBackend::open(
            "host=127.0.0.1 port=1 user=u password=hunter2 sslmode=require",
            "ns",
            &PostgresOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::FeatureDisabled {
                    feature: "postgres-tls",
                    ..
                }
            ),
            "{err}"
        );
        for query in ["sslmode=prefer", "sslmode=disable"] {
            let (_, p) = parse(&format!("postgres://h/db?{query}")).unwrap();
            assert!(matches!(Connector::new(&p, "<url>"), Ok(Connector::Plain)));
        }
    }

    #[cfg(feature = "postgres-tls")]
    #[test]
    fn a_missing_or_empty_root_file_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for path in [dir.path().join("missing.pem"), empty] {
            let (_, p) = parse(&format!(
                "postgres://h/db?sslmode=verify-full&sslrootcert={}",
                path.display()
            ))
            .unwrap();
            let Err(err) = Connector::new(&p, "<url>") else {
                panic!("{} was accepted", path.display());
            };
            assert!(matches!(err, StorageError::Config(_)), "{err}");
            assert!(err.to_string().contains("sslrootcert="), "{err}");
        }
    }
}
