//! Sealing the one-time team token at rest: AES-256-GCM with a random nonce per token, key from
//! `ORCHESTRATOR_SECRETS_KEY`. The plaintext lives only in memory on its way to the caller.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

use crate::config::Secret;

const NONCE_LEN: usize = 12;

#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// `nonce || ciphertext`.
    pub fn seal(&self, secret: &Secret, associated: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let payload = aes_gcm::aead::Payload {
            msg: secret.expose().as_bytes(),
            aad: associated,
        };
        // Encryption with a valid key and nonce cannot fail for inputs of this size.
        let ciphertext = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        let mut sealed = nonce.to_vec();
        sealed.extend(ciphertext);
        sealed
    }

    /// `None` if the data was sealed with another key or tampered with.
    pub fn open(&self, sealed: &[u8], associated: &[u8]) -> Option<Secret> {
        if sealed.len() <= NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let payload = aes_gcm::aead::Payload {
            msg: ciphertext,
            aad: associated,
        };
        let plain = self.cipher.decrypt(Nonce::from_slice(nonce), payload).ok()?;
        String::from_utf8(plain).ok().map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_binds_to_the_run() {
        let sealer = Sealer::new(&[7; 32]);
        let sealed = sealer.seal(&Secret::new("tok.secret"), b"run-1");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(sealer.open(&sealed, b"run-1").unwrap().expose(), "tok.secret");
        assert!(sealer.open(&sealed, b"run-2").is_none(), "bound to its run");
        assert!(Sealer::new(&[8; 32]).open(&sealed, b"run-1").is_none(), "other key");
    }
}
