//! Identity keys, signatures, key wrapping and fingerprints.
//!
//! All RSA private-key operations go through aws-lc-rs, not the `rsa` crate:
//! the latter carries RUSTSEC-2023-0071 (Marvin timing side channel, no fixed
//! release), and agentd signs challenges chosen by the relay, which would make
//! that timing remotely observable.
//!
//! * identity keys: RSA 2048/3072/4096, stored as PKCS#8 DER, published as
//!   X.509 SubjectPublicKeyInfo DER;
//! * signatures: RSA-PSS with SHA-256;
//! * key wrapping: RSA-OAEP with SHA-256 (and MGF1-SHA-256);
//! * fingerprints: SHA-256 of the SubjectPublicKeyInfo DER.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeyPair, KeySize as LcKeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
    PrivateDecryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::{
    KeyPair as _, UnparsedPublicKey, RSA_PSS_2048_8192_SHA256, RSA_PSS_SHA256,
};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::limits::{ALLOWED_RSA_BITS, MAX_PUBLIC_KEY_LEN, MAX_RSA_OUTPUT_LEN};

/// Why a cryptographic operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// The system could not generate a key or random bytes.
    #[error("key or random generation failed")]
    Generation,
    /// The stored private key is not a valid RSA PKCS#8 key.
    #[error("the private key is not a valid RSA PKCS#8 key")]
    InvalidPrivateKey,
    /// The public key is not RSA SubjectPublicKeyInfo DER of an allowed size.
    #[error("invalid public key: {0}")]
    InvalidPublicKey(String),
    /// A signature did not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// Unwrapping the message key or decrypting the body failed.
    #[error("decryption failed (not for this key, or altered)")]
    Decrypt,
    /// An envelope field is malformed or out of bounds.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// The envelope is addressed to someone else.
    #[error("envelope is addressed to {actual:?}, not {expected:?}")]
    WrongRecipient {
        /// Who we are.
        expected: String,
        /// Who the envelope names.
        actual: String,
    },
    /// The plaintext is larger than [`crate::limits::MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes is larger than the limit of {max} bytes", max = crate::limits::MAX_MESSAGE_LEN)]
    TooLarge(usize),
}

/// Allowed identity key sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeySize {
    /// 2048-bit modulus.
    Rsa2048,
    /// 3072-bit modulus (the default: about 128-bit security).
    #[default]
    Rsa3072,
    /// 4096-bit modulus.
    Rsa4096,
}

impl KeySize {
    /// Pick the size for a bit count, if allowed.
    pub fn from_bits(bits: usize) -> Option<Self> {
        match bits {
            2048 => Some(Self::Rsa2048),
            3072 => Some(Self::Rsa3072),
            4096 => Some(Self::Rsa4096),
            _ => None,
        }
    }

    fn lc(self) -> LcKeySize {
        match self {
            Self::Rsa2048 => LcKeySize::Rsa2048,
            Self::Rsa3072 => LcKeySize::Rsa3072,
            Self::Rsa4096 => LcKeySize::Rsa4096,
        }
    }
}

/// Fill a fresh array with bytes from the system CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    aws_lc_rs::rand::fill(&mut out).map_err(|_| CryptoError::Generation)?;
    Ok(out)
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A user's private identity key: signs, and unwraps message keys.
///
/// Never leaves agentd. `Debug` shows only the public fingerprint.
pub struct IdentityKey {
    signing: KeyPair,
    decrypting: OaepPrivateDecryptingKey,
    public: PublicKey,
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityKey")
            .field("public", &self.public.fingerprint())
            .finish_non_exhaustive()
    }
}

impl IdentityKey {
    /// Generate a new key pair.
    pub fn generate(size: KeySize) -> Result<Self, CryptoError> {
        let pair = KeyPair::generate(size.lc()).map_err(|_| CryptoError::Generation)?;
        let pkcs8 = Zeroizing::new(
            pair.as_der()
                .map_err(|_| CryptoError::Generation)?
                .as_ref()
                .to_vec(),
        );
        Self::from_pkcs8(&pkcs8)
    }

    /// Load a key from PKCS#8 DER.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CryptoError> {
        let signing = KeyPair::from_pkcs8(pkcs8).map_err(|_| CryptoError::InvalidPrivateKey)?;
        let decrypting = PrivateDecryptingKey::from_pkcs8(pkcs8)
            .and_then(|k| OaepPrivateDecryptingKey::new(k).map_err(Into::into))
            .map_err(|_| CryptoError::InvalidPrivateKey)?;
        let spki = signing
            .public_key()
            .as_der()
            .map_err(|_| CryptoError::InvalidPrivateKey)?;
        let public =
            PublicKey::from_der(spki.as_ref()).map_err(|_| CryptoError::InvalidPrivateKey)?;
        Ok(Self {
            signing,
            decrypting,
            public,
        })
    }

    /// The key as PKCS#8 DER, for storage (wiped when dropped).
    pub fn to_pkcs8(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let der = self
            .signing
            .as_der()
            .map_err(|_| CryptoError::InvalidPrivateKey)?;
        Ok(Zeroizing::new(der.as_ref().to_vec()))
    }

    /// The matching public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// RSA-PSS-SHA256 signature over `msg`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut sig = vec![0u8; self.signing.public_modulus_len()];
        self.signing
            .sign(&RSA_PSS_SHA256, &rng, msg, &mut sig)
            .map_err(|_| CryptoError::Generation)?;
        Ok(sig)
    }

    /// RSA-OAEP-SHA256 decryption of a wrapped message key.
    pub(crate) fn unwrap_key(&self, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if wrapped.len() > MAX_RSA_OUTPUT_LEN {
            return Err(CryptoError::Decrypt);
        }
        let mut out = Zeroizing::new(vec![0u8; self.decrypting.min_output_size()]);
        let len = self
            .decrypting
            .decrypt(&OAEP_SHA256_MGF1SHA256, wrapped, &mut out, None)
            .map_err(|_| CryptoError::Decrypt)?
            .len();
        out.truncate(len);
        Ok(out)
    }
}

/// A validated RSA public key (SubjectPublicKeyInfo DER).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    der: Vec<u8>,
    bits: usize,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey(rsa{}, {})", self.bits, self.fingerprint())
    }
}

impl PublicKey {
    /// Parse and check a SubjectPublicKeyInfo DER RSA key of an allowed size.
    pub fn from_der(der: &[u8]) -> Result<Self, CryptoError> {
        if der.len() > MAX_PUBLIC_KEY_LEN {
            return Err(CryptoError::InvalidPublicKey(format!(
                "{} bytes is larger than any allowed key",
                der.len()
            )));
        }
        let key = PublicEncryptingKey::from_der(der).map_err(|_| {
            CryptoError::InvalidPublicKey("not an RSA SubjectPublicKeyInfo DER key".into())
        })?;
        let bits = key.key_size_bits();
        if !ALLOWED_RSA_BITS.contains(&bits) {
            return Err(CryptoError::InvalidPublicKey(format!(
                "RSA-{bits} is not allowed; use 2048, 3072 or 4096 bits"
            )));
        }
        Ok(Self {
            der: der.to_vec(),
            bits,
        })
    }

    /// The DER encoding, as published in the directory.
    pub fn as_der(&self) -> &[u8] {
        &self.der
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// SHA-256 fingerprint of the DER encoding.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint(sha256(&self.der))
    }

    /// Check an RSA-PSS-SHA256 signature.
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        if signature.len() > MAX_RSA_OUTPUT_LEN {
            return Err(CryptoError::BadSignature);
        }
        UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, &self.der)
            .verify(msg, signature)
            .map_err(|_| CryptoError::BadSignature)
    }

    /// RSA-OAEP-SHA256 encryption of a message key.
    pub(crate) fn wrap_key(&self, key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let enc = PublicEncryptingKey::from_der(&self.der)
            .ok()
            .and_then(|k| OaepPublicEncryptingKey::new(k).ok())
            .ok_or_else(|| CryptoError::InvalidPublicKey("cannot encrypt to this key".into()))?;
        let mut out = vec![0u8; enc.ciphertext_size()];
        let len = enc
            .encrypt(&OAEP_SHA256_MGF1SHA256, key, &mut out, None)
            .map_err(|_| CryptoError::Generation)?
            .len();
        out.truncate(len);
        Ok(out)
    }
}

/// SHA-256 fingerprint of a public key.
///
/// Displayed as 16 groups of 4 hex digits, which is what users compare out
/// of band (like SSH fingerprints or Signal safety numbers).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Plain lowercase hex, 64 characters, for machines.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Read a fingerprint as people copy it: 64 hex digits in either case,
    /// optionally after `sha256:`, with any spaces, tabs and colons between.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let body = text
            .strip_prefix("sha256:")
            .or_else(|| text.strip_prefix("SHA256:"))
            .unwrap_or(text);
        let digits: String = body
            .chars()
            .filter(|c| !matches!(c, ' ' | ':' | '\t'))
            .collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(digits, &mut out).ok()?;
        Some(Self(out))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = self.to_hex();
        for (i, group) in hex.as_bytes().chunks(4).enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            // Chunks of an ASCII hex string are ASCII.
            f.write_str(std::str::from_utf8(group).map_err(|_| std::fmt::Error)?)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// What a login signature is for; part of the signed transcript so a
/// signature for one purpose is useless for another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginPurpose {
    /// A full login (password + TOTP + signature).
    Login,
    /// Resuming a session with a token.
    Resume,
    /// Proving possession of a new key before publishing it.
    PublishKey,
}

/// The bytes signed to answer a login challenge.
///
/// Binds the purpose, the username, the relay's fresh nonce and the TLS
/// session (keying material exported under [`crate::protocol::EXPORTER_LABEL`]),
/// so a signature cannot be replayed later or relayed to another connection.
pub fn login_transcript(
    purpose: LoginPurpose,
    username: &str,
    nonce: &[u8],
    tls_binding: &[u8],
) -> Vec<u8> {
    let purpose = match purpose {
        LoginPurpose::Login => b"login".as_slice(),
        LoginPurpose::Resume => b"resume",
        LoginPurpose::PublishKey => b"publish-key",
    };
    let mut out = Vec::with_capacity(64 + username.len() + nonce.len() + tls_binding.len());
    out.extend_from_slice(b"securechat-challenge-v1\0");
    for field in [purpose, username.as_bytes(), nonce, tls_binding] {
        put_field(&mut out, field);
    }
    out
}

/// Append a length-prefixed field; length prefixes keep field boundaries
/// unambiguous in signed transcripts.
pub(crate) fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    // Every field here is bounded far below 4 GiB by the frame limit.
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_fingerprint() {
        let key = IdentityKey::generate(KeySize::Rsa2048).unwrap();
        let sig = key.sign(b"hello").unwrap();
        key.public_key().verify(b"hello", &sig).unwrap();
        assert_eq!(
            key.public_key().verify(b"hellp", &sig),
            Err(CryptoError::BadSignature)
        );
        let shown = key.public_key().fingerprint().to_string();
        assert_eq!(shown.len(), 64 + 15);
        assert_eq!(shown.split(' ').count(), 16);
    }

    #[test]
    fn pkcs8_round_trip_keeps_the_key() {
        let key = IdentityKey::generate(KeySize::Rsa2048).unwrap();
        let again = IdentityKey::from_pkcs8(&key.to_pkcs8().unwrap()).unwrap();
        assert_eq!(key.public_key(), again.public_key());
        assert_eq!(
            IdentityKey::from_pkcs8(b"not a key").unwrap_err(),
            CryptoError::InvalidPrivateKey
        );
    }

    #[test]
    fn rejects_bad_public_keys() {
        assert!(PublicKey::from_der(b"junk").is_err());
        assert!(PublicKey::from_der(&[0u8; 5000]).is_err());
    }

    #[test]
    fn transcripts_differ_by_purpose_and_binding() {
        let a = login_transcript(LoginPurpose::Login, "alice", &[1; 32], &[2; 32]);
        let b = login_transcript(LoginPurpose::Resume, "alice", &[1; 32], &[2; 32]);
        let c = login_transcript(LoginPurpose::Login, "alice", &[1; 32], &[3; 32]);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
