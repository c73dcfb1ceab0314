//! Encryption keys and the AES-256-GCM cipher (with the `encryption` feature).
//!
//! A key is either 32 raw bytes or a passphrase. A passphrase is stretched with Argon2id and a
//! random salt that each store keeps beside its records (the store does that at open), so the
//! same passphrase gives different keys in different stores. Key material is never printed:
//! `Debug` shows only what kind of key it is.
//!
//! Zeroizing: the raw key and the passphrase are wiped on drop (`zeroize`), and so is
//! Argon2's working memory (the `argon2` crate's `zeroize` feature). The AES key schedule
//! inside [`ring`]'s `LessSafeKey` is not: ring keeps it private and does not wipe it on drop
//! (ring's own choice; see briansmith/ring#15), so it lives in the [`Cipher`] for as long as
//! the store is open and in freed memory afterwards.
//!
//! The parameters of a passphrase's key derivation ([`KdfParams`]) are stored beside the
//! records, so they are untrusted: they are checked against [`kdf_limits`] before any work.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Result, StorageError};

/// Length of an AES-256 key.
pub const KEY_LEN: usize = 32;
/// Length of the random nonce stored in every encrypted record.
pub const NONCE_LEN: usize = 12;
/// Length of the GCM authentication tag appended to the ciphertext.
pub const TAG_LEN: usize = 16;

#[derive(Clone)]
// Without the `encryption` feature the key is kept (and redacted) but never used.
#[cfg_attr(not(feature = "encryption"), allow(dead_code))]
enum KeySource {
    Raw(Zeroizing<[u8; KEY_LEN]>),
    Passphrase(Zeroizing<String>),
}

/// The secret a store encrypts with: 32 raw bytes, or a passphrase stretched with Argon2id.
///
/// ```
/// use bevy_storage::EncryptionKey;
/// let key = EncryptionKey::from_passphrase("correct horse battery staple").unwrap();
/// assert!(!format!("{key:?}").contains("horse"));
/// let raw = EncryptionKey::from_hex(&"ab".repeat(32)).unwrap();
/// assert_eq!(format!("{raw:?}"), "EncryptionKey(raw 256-bit key, redacted)");
/// ```
#[derive(Clone)]
pub struct EncryptionKey(KeySource);

impl EncryptionKey {
    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(KeySource::Raw(Zeroizing::new(bytes)))
    }

    /// A key from a slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let raw: [u8; KEY_LEN] = bytes.try_into().map_err(|_| {
            StorageError::InvalidEncryptionKey(format!(
                "a raw key must be {KEY_LEN} bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(Self::from_bytes(raw))
    }

    /// A key from 64 hexadecimal digits (handy for environment variables).
    pub fn from_hex(hex: &str) -> Result<Self> {
        let hex = hex.trim();
        if hex.len() != KEY_LEN * 2 || !hex.is_ascii() {
            return Err(StorageError::InvalidEncryptionKey(format!(
                "a hex key must be {} hex digits, got {} characters",
                KEY_LEN * 2,
                hex.chars().count()
            )));
        }
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        for (i, byte) in raw.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| {
                StorageError::InvalidEncryptionKey("a hex key may hold only 0-9 and a-f".into())
            })?;
        }
        Ok(Self(KeySource::Raw(raw)))
    }

    /// A key from a passphrase (at least 8 characters), stretched with Argon2id when the
    /// store opens.
    pub fn from_passphrase(passphrase: impl Into<String>) -> Result<Self> {
        let passphrase = Zeroizing::new(passphrase.into());
        if passphrase.chars().count() < 8 {
            return Err(StorageError::InvalidEncryptionKey(
                "a passphrase must be at least 8 characters".into(),
            ));
        }
        Ok(Self(KeySource::Passphrase(passphrase)))
    }

    /// A fresh random key (store it somewhere safe: records encrypted with it are lost
    /// without it).
    pub fn generate() -> Result<Self> {
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(raw.as_mut()).map_err(|e| {
            StorageError::InvalidEncryptionKey(format!("the OS random source failed: {e}"))
        })?;
        Ok(Self(KeySource::Raw(raw)))
    }

    /// True for a passphrase key (which needs a salt to become a cipher).
    pub fn is_passphrase(&self) -> bool {
        matches!(self.0, KeySource::Passphrase(_))
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            KeySource::Raw(_) => f.write_str("EncryptionKey(raw 256-bit key, redacted)"),
            KeySource::Passphrase(_) => f.write_str("EncryptionKey(passphrase, redacted)"),
        }
    }
}

/// Argon2id parameters and salt used to stretch a passphrase; stored (not secret) with the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Random per-store salt.
    pub salt: [u8; 16],
    /// Memory cost in KiB.
    pub m_cost: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Parallelism.
    pub p_cost: u32,
}

impl KdfParams {
    /// OWASP's recommended Argon2id settings (19 MiB, 2 passes, 1 lane) with a fresh salt.
    pub fn generate() -> Result<Self> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| {
            StorageError::InvalidEncryptionKey(format!("the OS random source failed: {e}"))
        })?;
        Ok(Self {
            salt,
            m_cost: 19 * 1024,
            t_cost: 2,
            p_cost: 1,
        })
    }
}

/// Bounds on the Argon2id parameters a store may hold. They are read from storage, so they
/// are checked before any work: a save file edited to ask for 4 GiB of memory or a million
/// passes is refused at once instead of stalling the game. Within these bounds stretching a
/// passphrase takes well under a second in an optimized build.
pub mod kdf_limits {
    /// Most memory, in KiB (46 MiB, the most of OWASP's recommended settings; the default
    /// is 19 MiB).
    pub const MAX_M_COST_KIB: u32 = 46 * 1024;
    /// Fewest memory KiB (Argon2's own floor is 8 per lane).
    pub const MIN_M_COST_KIB: u32 = 8;
    /// Most passes (the default is 2).
    pub const MAX_T_COST: u32 = 8;
    /// Most lanes (the default is 1; lanes run one after another here).
    pub const MAX_P_COST: u32 = 4;
    /// Most total work, memory × passes, in KiB (96 MiB-passes, twice OWASP's; the default
    /// is 38).
    pub const MAX_WORK_KIB: u64 = 96 * 1024;
}

impl KdfParams {
    /// Checks the parameters against [`kdf_limits`] before any work is done; the message
    /// says which one is out of bounds.
    pub fn check_bounds(&self) -> std::result::Result<(), String> {
        use kdf_limits::*;
        if !(1..=MAX_P_COST).contains(&self.p_cost) {
            return Err(format!(
                "Argon2 lanes {} outside 1..={MAX_P_COST}",
                self.p_cost
            ));
        }
        if !(1..=MAX_T_COST).contains(&self.t_cost) {
            return Err(format!(
                "Argon2 passes {} outside 1..={MAX_T_COST}",
                self.t_cost
            ));
        }
        let min_memory = MIN_M_COST_KIB * self.p_cost;
        if !(min_memory..=MAX_M_COST_KIB).contains(&self.m_cost) {
            return Err(format!(
                "Argon2 memory {} KiB outside {min_memory}..={MAX_M_COST_KIB} KiB",
                self.m_cost
            ));
        }
        let work = u64::from(self.m_cost) * u64::from(self.t_cost);
        if work > MAX_WORK_KIB {
            return Err(format!(
                "Argon2 work of {} KiB × {} passes is over the limit of {MAX_WORK_KIB} KiB-passes",
                self.m_cost, self.t_cost
            ));
        }
        Ok(())
    }

    /// The parameters as bytes, bound into the store's key check so that they are
    /// authenticated by the key itself.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(28);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.m_cost.to_le_bytes());
        out.extend_from_slice(&self.t_cost.to_le_bytes());
        out.extend_from_slice(&self.p_cost.to_le_bytes());
        out
    }
}

/// A ready-to-use AES-256-GCM cipher (through [`ring`]'s AES-NI/CLMUL assembly where the CPU
/// has them). Cheap to share behind an `Arc`.
#[derive(Clone)]
pub struct Cipher {
    #[cfg(feature = "encryption")]
    aead: ring::aead::LessSafeKey,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(AES-256-GCM, key redacted)")
    }
}

#[cfg(feature = "encryption")]
impl Cipher {
    /// Builds the cipher for `key`; a passphrase needs the store's [`KdfParams`].
    pub fn new(key: &EncryptionKey, kdf: Option<&KdfParams>) -> Result<Self> {
        let raw: Zeroizing<[u8; KEY_LEN]> = match (&key.0, kdf) {
            (KeySource::Raw(raw), _) => raw.clone(),
            (KeySource::Passphrase(pass), Some(params)) => {
                params.check_bounds().map_err(|reason| {
                    StorageError::InvalidEncryptionKey(format!(
                        "refusing the store's key-derivation parameters: {reason}"
                    ))
                })?;
                let argon = argon2::Argon2::new(
                    argon2::Algorithm::Argon2id,
                    argon2::Version::V0x13,
                    argon2::Params::new(params.m_cost, params.t_cost, params.p_cost, Some(KEY_LEN))
                        .map_err(|e| {
                            StorageError::InvalidEncryptionKey(format!(
                                "bad Argon2 parameters: {e}"
                            ))
                        })?,
                );
                let mut out = Zeroizing::new([0u8; KEY_LEN]);
                argon
                    .hash_password_into(pass.as_bytes(), &params.salt, out.as_mut())
                    .map_err(|e| {
                        StorageError::InvalidEncryptionKey(format!("Argon2 failed: {e}"))
                    })?;
                out
            }
            (KeySource::Passphrase(_), None) => {
                return Err(StorageError::InvalidEncryptionKey(
                    "a passphrase needs the store's salt; open a Store instead".into(),
                ));
            }
        };
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, raw.as_ref())
            .map_err(|_| StorageError::InvalidEncryptionKey("bad key length".into()))?;
        Ok(Self {
            aead: ring::aead::LessSafeKey::new(key),
        })
    }

    /// Encrypts `buf` in place with a fresh random nonce; returns the nonce and the tag.
    pub fn encrypt_in_place(
        &self,
        aad: &[&[u8]],
        buf: &mut [u8],
    ) -> Result<([u8; NONCE_LEN], [u8; TAG_LEN])> {
        use ring::aead::{Aad, Nonce};
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| {
            StorageError::backend("codec", format!("the OS random source failed: {e}"))
        })?;
        let aad = aad.concat();
        let tag = self
            .aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), buf)
            .map_err(|_| StorageError::backend("codec", "AES-GCM encryption failed"))?;
        let tag: [u8; TAG_LEN] = tag.as_ref().try_into().expect("GCM tags are 16 bytes");
        Ok((nonce, tag))
    }

    /// Decrypts `buf` in place; `false` if the tag does not verify (wrong key or tampering).
    pub fn decrypt_in_place(
        &self,
        aad: &[&[u8]],
        nonce: &[u8; NONCE_LEN],
        tag: &[u8; TAG_LEN],
        buf: &mut [u8],
    ) -> bool {
        use ring::aead::{Aad, Nonce, Tag};
        let aad = aad.concat();
        let tag = Tag::from(*tag);
        self.aead
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(&aad),
                tag,
                buf,
                0..,
            )
            .is_ok()
    }
}

#[cfg(not(feature = "encryption"))]
impl Cipher {
    /// Without the `encryption` feature no cipher can be built.
    pub fn new(_key: &EncryptionKey, _kdf: Option<&KdfParams>) -> Result<Self> {
        Err(StorageError::FeatureDisabled {
            feature: "encryption",
            what: "an encryption key".into(),
        })
    }

    /// Never called: a `Cipher` cannot exist without the feature.
    pub fn encrypt_in_place(
        &self,
        _aad: &[&[u8]],
        _buf: &mut [u8],
    ) -> Result<([u8; NONCE_LEN], [u8; TAG_LEN])> {
        unreachable!("Cipher cannot be constructed without the encryption feature")
    }

    /// Never called: a `Cipher` cannot exist without the feature.
    pub fn decrypt_in_place(
        &self,
        _aad: &[&[u8]],
        _nonce: &[u8; NONCE_LEN],
        _tag: &[u8; TAG_LEN],
        _buf: &mut [u8],
    ) -> bool {
        unreachable!("Cipher cannot be constructed without the encryption feature")
    }
}

#[cfg(all(test, feature = "encryption"))]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The cipher is standard AES-256-GCM (NIST GCM spec, test case 14), so records written
    /// by any conforming implementation, earlier versions of this crate included, still open.
    #[test]
    fn matches_the_nist_test_vector() {
        let cipher = Cipher::new(&EncryptionKey::from_bytes([0; KEY_LEN]), None).unwrap();
        let mut buf = hex("cea7403d4d606b6e074ec5d3baf39d18");
        let tag: [u8; TAG_LEN] = hex("d0d1c8a799996bf0265b98b5d48ab919").try_into().unwrap();
        assert!(cipher.decrypt_in_place(&[], &[0; NONCE_LEN], &tag, &mut buf));
        assert_eq!(buf, [0; 16]);
        // A flipped bit anywhere fails authentication.
        let mut bad = hex("cea7403d4d606b6e074ec5d3baf39d19");
        assert!(!cipher.decrypt_in_place(&[], &[0; NONCE_LEN], &tag, &mut bad));
        let mut ciphertext = hex("cea7403d4d606b6e074ec5d3baf39d18");
        assert!(!cipher.decrypt_in_place(&[b"aad"], &[0; NONCE_LEN], &tag, &mut ciphertext));
    }

    #[test]
    fn round_trips_with_associated_data() {
        let cipher = Cipher::new(&EncryptionKey::from_bytes([7; KEY_LEN]), None).unwrap();
        let mut buf = b"a secret save file".to_vec();
        let (nonce, tag) = cipher
            .encrypt_in_place(&[b"head", b"key"], &mut buf)
            .unwrap();
        assert_ne!(buf, b"a secret save file");
        let mut wrong_aad = buf.clone();
        assert!(!cipher.decrypt_in_place(&[b"head", b"other"], &nonce, &tag, &mut wrong_aad));
        assert!(cipher.decrypt_in_place(&[b"head", b"key"], &nonce, &tag, &mut buf));
        assert_eq!(buf, b"a secret save file");
    }
}
