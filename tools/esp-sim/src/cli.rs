//! The `esp-sim` binary's flags; each also reads an `ESP_SIM_*` environment variable.
//! Durations take a unit: `250ms`, `50us`, `2s`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::{Api, EspSimConfig, FaultRates, Faults, parse_duration};

/// Runs the ESP simulator on 127.0.0.1 until SIGTERM or ctrl-c.
#[derive(Clone, Debug, Parser)]
#[command(name = "esp-sim", version, about)]
pub struct Cli {
    /// Port on 127.0.0.1 (0 picks a free one; the URL is printed on stdout).
    #[arg(long, env = "ESP_SIM_PORT", default_value_t = 8089)]
    pub port: u16,
    /// Upload calls allowed in progress at once.
    #[arg(long, env = "ESP_SIM_UPLOAD_LIMIT", default_value_t = 10)]
    pub upload_limit: u32,
    /// Send calls allowed in progress at once.
    #[arg(long, env = "ESP_SIM_SEND_LIMIT", default_value_t = 10)]
    pub send_limit: u32,
    /// Calls per second over uploads and sends together (sliding 1-s window of accepted calls;
    /// one more gets 429 and counts as an over-rate attempt). At least 1; unset: no rate limit.
    #[arg(long, env = "ESP_SIM_CALLS_PER_SECOND")]
    pub calls_per_second: Option<f64>,
    #[arg(long, env = "ESP_SIM_UPLOAD_CALL_LATENCY", default_value = "200ms", value_parser = parse_duration)]
    pub upload_call_latency: Duration,
    #[arg(long, env = "ESP_SIM_UPLOAD_PER_RECIPIENT", default_value = "50us", value_parser = parse_duration)]
    pub upload_per_recipient: Duration,
    #[arg(long, env = "ESP_SIM_SEND_CALL_LATENCY", default_value = "100ms", value_parser = parse_duration)]
    pub send_call_latency: Duration,
    #[arg(long, env = "ESP_SIM_SEND_PER_RECIPIENT", default_value = "1us", value_parser = parse_duration)]
    pub send_per_recipient: Duration,
    /// How long after accept a send's status turns `done`.
    #[arg(long, env = "ESP_SIM_SETTLE_DELAY", default_value = "2s", value_parser = parse_duration)]
    pub settle_delay: Duration,
    /// `Retry-After` sent with 429s.
    #[arg(long, env = "ESP_SIM_RETRY_AFTER", default_value = "1s", value_parser = parse_duration)]
    pub retry_after: Duration,
    /// Required as `Authorization: Bearer <key>` when set.
    #[arg(long, env = "ESP_SIM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seeds the fault dice.
    #[arg(long, env = "ESP_SIM_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Share of calls answered 500 (no work done).
    #[arg(long, env = "ESP_SIM_FAULT_ERROR", default_value_t = 0.0)]
    pub fault_error: f64,
    /// Share of calls answered 429 (no work done, not an over-limit attempt).
    #[arg(long, env = "ESP_SIM_FAULT_RATE_LIMIT", default_value_t = 0.0)]
    pub fault_rate_limit: f64,
    /// Share of calls done and recorded whose answer is withheld.
    #[arg(long, env = "ESP_SIM_FAULT_TIMEOUT", default_value_t = 0.0)]
    pub fault_timeout: f64,
    /// Share of calls slowed down by `--spike-factor`.
    #[arg(long, env = "ESP_SIM_FAULT_SPIKE", default_value_t = 0.0)]
    pub fault_spike: f64,
    /// The APIs the fault shares apply to.
    #[arg(long, env = "ESP_SIM_FAULT_APIS", value_delimiter = ',', default_value = "upload,send")]
    pub fault_apis: Vec<Api>,
    #[arg(long, env = "ESP_SIM_SPIKE_FACTOR", default_value_t = 10.0)]
    pub spike_factor: f64,
    /// How long a timed-out answer is withheld before the connection is dropped.
    #[arg(long, env = "ESP_SIM_TIMEOUT_HOLD", default_value = "120s", value_parser = parse_duration)]
    pub timeout_hold: Duration,
    /// Recipients at this domain bounce; empty for none.
    #[arg(long, env = "ESP_SIM_BOUNCE_DOMAIN", default_value = crate::config::DEFAULT_BOUNCE_DOMAIN)]
    pub bounce_domain: String,
    /// Distinct addresses kept per request for `/_sim/deliveries`.
    #[arg(long, env = "ESP_SIM_KEEP_ADDRESSES_MAX", default_value_t = 1_000)]
    pub keep_addresses_max: usize,
    /// Most recipients one send may carry in place of a list.
    #[arg(long, env = "ESP_SIM_INLINE_RECIPIENTS_MAX", default_value_t = crate::config::DEFAULT_INLINE_RECIPIENTS_MAX)]
    pub inline_recipients_max: usize,
    /// Writes the final report (JSON) here on shutdown.
    #[arg(long, env = "ESP_SIM_REPORT_OUT")]
    pub report_out: Option<PathBuf>,
}

impl Cli {
    /// The simulator configuration these flags describe.
    pub fn config(&self) -> EspSimConfig {
        let rates = FaultRates {
            error: self.fault_error,
            rate_limit: self.fault_rate_limit,
            timeout_after_accept: self.fault_timeout,
            latency_spike: self.fault_spike,
        };
        let mut faults =
            Faults { spike_factor: self.spike_factor, timeout_hold: self.timeout_hold, ..Faults::none() };
        for api in &self.fault_apis {
            *faults.rates_mut(*api) = rates;
        }
        EspSimConfig {
            port: self.port,
            upload_limit: self.upload_limit,
            send_limit: self.send_limit,
            calls_per_second: self.calls_per_second,
            upload_call_latency: self.upload_call_latency,
            upload_per_recipient: self.upload_per_recipient,
            send_call_latency: self.send_call_latency,
            send_per_recipient: self.send_per_recipient,
            settle_delay: self.settle_delay,
            retry_after: self.retry_after,
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            faults,
            seed: self.seed,
            bounce_domain: Some(self.bounce_domain.clone()).filter(|d| !d.is_empty()),
            keep_addresses_max: self.keep_addresses_max,
            inline_recipients_max: self.inline_recipients_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_flags_give_the_default_configuration_on_port_8089() {
        let cli = Cli::try_parse_from(["esp-sim"]).unwrap();
        assert_eq!(cli.config(), EspSimConfig { port: 8089, ..EspSimConfig::default() });
    }

    #[test]
    fn fault_flags_apply_to_the_named_apis_only() {
        let cli = Cli::try_parse_from([
            "esp-sim",
            "--fault-timeout",
            "0.1",
            "--fault-apis",
            "send",
            "--send-call-latency",
            "5ms",
            "--bounce-domain",
            "",
        ])
        .unwrap();
        let config = cli.config();
        assert_eq!(config.faults.send.timeout_after_accept, 0.1);
        assert_eq!(config.faults.upload, FaultRates::default());
        assert_eq!(config.send_call_latency, Duration::from_millis(5));
        assert_eq!(config.bounce_domain, None);
        assert_eq!(config.calls_per_second, None);
    }

    #[test]
    fn the_rate_flag_sets_calls_per_second() {
        let cli = Cli::try_parse_from(["esp-sim", "--calls-per-second", "20"]).unwrap();
        assert_eq!(cli.config().calls_per_second, Some(20.0));
    }
}
