//! `source = "aws"`: the key from AWS Secrets Manager, through aws-config's default credential
//! chain (environment, shared profile, web identity / EKS IRSA, ECS and EKS Pod Identity
//! container credentials, IMDSv2): whatever the pod, task or instance already has.
//!
//! A JSON SecretString (`{"api_key": "..."}`) is read with `json_key`. Rotation is picked up
//! by the periodic refresh and by the upstream-401 refresh; `version_stage` pins a stage.
//! The SDK's HTTP client uses rustls with ring, like the rest of the proxy.

use aws_sdk_secretsmanager::error::DisplayErrorContext;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use secrecy::SecretString;
use zeroize::Zeroizing;

use super::{KeyError, KeySource};
use crate::config::AwsConfig;

pub struct AwsSource {
    client: aws_sdk_secretsmanager::Client,
    config: AwsConfig,
}

impl AwsSource {
    /// Resolve the credential chain and region (no request is made yet).
    pub async fn new(config: &AwsConfig) -> AwsSource {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        let sdk_config = loader.load().await;
        AwsSource {
            client: aws_sdk_secretsmanager::Client::new(&sdk_config),
            config: config.clone(),
        }
    }
}

#[async_trait::async_trait]
impl KeySource for AwsSource {
    fn kind(&self) -> &'static str {
        "aws"
    }

    async fn fetch(&self) -> Result<SecretString, KeyError> {
        let secret_id = &self.config.secret_id;
        let output = self
            .client
            .get_secret_value()
            .secret_id(secret_id)
            .set_version_stage(self.config.version_stage.clone())
            .send()
            .await
            .map_err(|e| KeyError::Source(format!("aws secret {secret_id}: {}", DisplayErrorContext(&e))))?;
        let Some(text) = output.secret_string() else {
            return Err(KeyError::Source(format!(
                "aws secret {secret_id} has no SecretString (binary secrets are not supported)"
            )));
        };
        let Some(json_key) = &self.config.json_key else {
            return Ok(SecretString::from(text.to_string()));
        };
        let parsed: Zeroizing<String> = Zeroizing::new(text.to_string());
        let json: serde_json::Value = serde_json::from_str(&parsed).map_err(|_| {
            KeyError::Source(format!(
                "aws secret {secret_id}: json_key is set but the SecretString is not JSON"
            ))
        })?;
        match json.get(json_key) {
            Some(serde_json::Value::String(value)) => Ok(SecretString::from(value.clone())),
            Some(_) => Err(KeyError::Source(format!(
                "aws secret {secret_id}: field {json_key:?} is not a string"
            ))),
            None => Err(KeyError::Source(format!(
                "aws secret {secret_id} has no field {json_key:?}"
            ))),
        }
    }
}
