use haishin_stand_ins::oidc::{IdClaims, KeySetServer, TokenSigner};

use crate::common::verify;

const SERVICE_ACCOUNT: &str = "pubsub-push@haishin.iam.gserviceaccount.com";
const AUDIENCE: &str = "http://127.0.0.1:9/push/requests";

#[tokio::test]
async fn tokens_verify_against_the_served_key_set() {
    let signer = TokenSigner::new();
    let key_set = KeySetServer::start(&signer, 0).await.unwrap();
    assert!(key_set.jwks_url().ends_with("/oauth2/v3/certs"));

    let token = signer.sign(AUDIENCE, SERVICE_ACCOUNT);

    let (claims, kid) = verify(&token, &key_set.jwks_url(), AUDIENCE).await.unwrap();
    assert_eq!(kid, signer.key_id());
    assert_eq!(claims["iss"], "https://accounts.google.com");
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["email"], SERVICE_ACCOUNT);
    assert_eq!(claims["email_verified"], true);
    assert!(claims["sub"].as_str().unwrap().chars().all(|c| c.is_ascii_digit()));
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 3600);
    // Tokens are reused while fresh, as Google's are.
    assert_eq!(signer.sign(AUDIENCE, SERVICE_ACCOUNT), token);
    assert_ne!(signer.sign("http://other", SERVICE_ACCOUNT), token);
}

#[tokio::test]
async fn the_key_set_has_googles_shape() {
    let signer = TokenSigner::new();
    let key_set = KeySetServer::start(&signer, 0).await.unwrap();

    let jwks: serde_json::Value = reqwest::get(key_set.jwks_url()).await.unwrap().json().await.unwrap();

    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "RSA");
    assert_eq!(key["alg"], "RS256");
    assert_eq!(key["use"], "sig");
    assert_eq!(key["kid"], signer.key_id());
    assert_eq!(key["e"], "AQAB");
    // A 2048-bit modulus is 256 bytes, 342 characters of unpadded base64url.
    assert_eq!(key["n"].as_str().unwrap().len(), 342);
}

#[tokio::test]
async fn impostor_tokens_are_refused() {
    let signer = TokenSigner::new();
    let key_set = KeySetServer::start(&signer, 0).await.unwrap();
    let impostor = TokenSigner::impostor();
    assert_eq!(impostor.key_id(), signer.key_id());

    let forged = impostor.sign(AUDIENCE, SERVICE_ACCOUNT);

    let refused = verify(&forged, &key_set.jwks_url(), AUDIENCE).await.unwrap_err();
    assert_eq!(refused, "InvalidSignature");
}

#[tokio::test]
async fn expired_and_misaddressed_tokens_are_refused() {
    let signer = TokenSigner::new();
    let key_set = KeySetServer::start(&signer, 0).await.unwrap();
    let mut claims = IdClaims::new(AUDIENCE, SERVICE_ACCOUNT);
    claims.iat -= 7200;
    claims.exp -= 7200;

    let expired = signer.sign_claims(&claims);
    let misaddressed = signer.sign("http://127.0.0.1:9/elsewhere", SERVICE_ACCOUNT);

    assert_eq!(verify(&expired, &key_set.jwks_url(), AUDIENCE).await.unwrap_err(), "ExpiredSignature");
    assert_eq!(verify(&misaddressed, &key_set.jwks_url(), AUDIENCE).await.unwrap_err(), "InvalidAudience");
}
