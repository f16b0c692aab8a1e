//! What the simulator is told at start: limits, latencies, faults, ledger options.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One of the two ESP APIs that do work and are concurrency-limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /v1/lists`.
    Upload,
    /// `POST /v1/sends`.
    Send,
}

impl Api {
    pub const ALL: [Api; 2] = [Api::Upload, Api::Send];

    pub fn as_str(self) -> &'static str {
        match self {
            Api::Upload => "upload",
            Api::Send => "send",
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Api {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "upload" => Ok(Api::Upload),
            "send" => Ok(Api::Send),
            other => Err(format!("unknown api `{other}` (upload or send)")),
        }
    }
}

/// The simulator's configuration. `Default` gives a moderately slow ESP with limits of 10.
#[derive(Clone, Debug, PartialEq)]
pub struct EspSimConfig {
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Upload calls allowed in progress at once; one more gets 429 (an over-limit attempt).
    pub upload_limit: u32,
    /// Send calls allowed in progress at once.
    pub send_limit: u32,
    /// Calls per second over the calls that change something, uploads and sends together.
    /// A call arriving when the last second (sliding) already holds `floor(rate)` accepted
    /// calls gets 429 with `retry_after`, does nothing, and is counted as an over-rate attempt.
    /// Checked before the concurrency limits; `None` limits no rate.
    pub calls_per_second: Option<f64>,
    /// Fixed part of an upload's latency.
    pub upload_call_latency: Duration,
    /// Added to an upload's latency per recipient of the list.
    pub upload_per_recipient: Duration,
    /// Fixed part of a send's latency.
    pub send_call_latency: Duration,
    /// Added to a send's latency per recipient of the list.
    pub send_per_recipient: Duration,
    /// How long after a send is accepted its status turns `done`.
    pub settle_delay: Duration,
    /// The `Retry-After` sent with every 429 (rounded up to whole seconds on the wire).
    pub retry_after: Duration,
    /// When set, every `/v1` call needs `Authorization: Bearer <key>` (401 otherwise).
    pub api_key: Option<String>,
    /// Faults injected from the start (changeable at runtime).
    pub faults: Faults,
    /// Seeds the fault dice, so that a run can be repeated.
    pub seed: u64,
    /// Recipients at this domain bounce instead of being delivered; `None` bounces no one.
    pub bounce_domain: Option<String>,
    /// Per request, how many distinct addresses are kept for `/_sim/deliveries` (and lists of
    /// at most this many recipients keep their addresses). Beyond it only address hashes are
    /// kept, which is what keeps the ledger small for tens of millions of recipients.
    pub keep_addresses_max: usize,
    /// Most recipients one send may carry in place of a list (`POST /v1/sends` with
    /// `recipients`); a send with more is refused (400).
    pub inline_recipients_max: usize,
}

impl Default for EspSimConfig {
    fn default() -> Self {
        Self {
            port: 0,
            upload_limit: 10,
            send_limit: 10,
            calls_per_second: None,
            upload_call_latency: Duration::from_millis(200),
            upload_per_recipient: Duration::from_micros(50),
            send_call_latency: Duration::from_millis(100),
            send_per_recipient: Duration::from_micros(1),
            settle_delay: Duration::from_secs(2),
            retry_after: Duration::from_secs(1),
            api_key: None,
            faults: Faults::default(),
            seed: 0,
            bounce_domain: Some(DEFAULT_BOUNCE_DOMAIN.to_owned()),
            keep_addresses_max: 1_000,
            inline_recipients_max: DEFAULT_INLINE_RECIPIENTS_MAX,
        }
    }
}

/// Most recipients a send may carry in place of a list, unless configured otherwise.
pub const DEFAULT_INLINE_RECIPIENTS_MAX: usize = 1_000;

/// Where recipients bounce unless configured otherwise.
pub const DEFAULT_BOUNCE_DOMAIN: &str = "bounce.invalid";

impl EspSimConfig {
    /// A fast simulator for tests: no latency beyond `call_latency`, a settle delay of 50 ms.
    pub fn fast(limit: u32, call_latency: Duration) -> Self {
        Self {
            upload_limit: limit,
            send_limit: limit,
            upload_call_latency: call_latency,
            upload_per_recipient: Duration::ZERO,
            send_call_latency: call_latency,
            send_per_recipient: Duration::ZERO,
            settle_delay: Duration::from_millis(50),
            ..Self::default()
        }
    }

    /// Checks the values no simulator can run with.
    pub fn validate(&self) -> Result<(), String> {
        if self.upload_limit == 0 || self.send_limit == 0 {
            return Err("upload_limit and send_limit must be at least 1".into());
        }
        if let Some(rate) = self.calls_per_second
            && !(rate.is_finite() && rate >= 1.0)
        {
            return Err(format!("calls_per_second is {rate}, it must be at least 1"));
        }
        if self.api_key.as_deref() == Some("") {
            return Err("api_key is empty".into());
        }
        self.faults.validate()
    }

    /// The latency of a call of `api` over `recipients` recipients, before any spike.
    pub fn latency(&self, api: Api, recipients: usize) -> Duration {
        let (call, per) = match api {
            Api::Upload => (self.upload_call_latency, self.upload_per_recipient),
            Api::Send => (self.send_call_latency, self.send_per_recipient),
        };
        let n = u32::try_from(recipients).unwrap_or(u32::MAX);
        call.saturating_add(per.saturating_mul(n))
    }
}

/// Shares (0 to 1) of an API's calls that get each fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRates {
    /// Answered 500 without doing anything.
    pub error: f64,
    /// Answered 429 without doing anything; not counted as an over-limit attempt.
    pub rate_limit: f64,
    /// Done and recorded, but the answer is withheld for `timeout_hold` and the
    /// connection then dropped, so that the caller cannot know.
    pub timeout_after_accept: f64,
    /// Take `spike_factor` times their normal latency (independent of the three above).
    pub latency_spike: f64,
}

impl FaultRates {
    fn validate(&self, api: &str) -> Result<(), String> {
        for (name, rate) in [
            ("error", self.error),
            ("rate_limit", self.rate_limit),
            ("timeout_after_accept", self.timeout_after_accept),
            ("latency_spike", self.latency_spike),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{api}.{name} is {rate}, not a share between 0 and 1"));
            }
        }
        let exclusive = self.error + self.rate_limit + self.timeout_after_accept;
        if exclusive > 1.0 + 1e-9 {
            return Err(format!(
                "{api}: error + rate_limit + timeout_after_accept is {exclusive}, more than 1"
            ));
        }
        Ok(())
    }
}

/// Faults injected into the upload and send APIs. Lookups and status reads are never faulted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub upload: FaultRates,
    pub send: FaultRates,
    /// How many times longer a spiked call takes (default 10).
    pub spike_factor: f64,
    /// How long the answer to a timed-out-after-accept call is withheld before the
    /// connection is dropped (default 120 s: longer than any sane client timeout).
    #[serde(rename = "timeout_hold_ms", with = "duration_ms")]
    pub timeout_hold: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            upload: FaultRates::default(),
            send: FaultRates::default(),
            spike_factor: 10.0,
            timeout_hold: Duration::from_secs(120),
        }
    }
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// The same rates for both APIs.
    pub fn both(rates: FaultRates) -> Self {
        Self { upload: rates, send: rates, ..Self::default() }
    }

    /// These rates for one API, none for the other.
    pub fn only(api: Api, rates: FaultRates) -> Self {
        let mut faults = Self::default();
        *faults.rates_mut(api) = rates;
        faults
    }

    pub fn rates(&self, api: Api) -> &FaultRates {
        match api {
            Api::Upload => &self.upload,
            Api::Send => &self.send,
        }
    }

    pub fn rates_mut(&mut self, api: Api) -> &mut FaultRates {
        match api {
            Api::Upload => &mut self.upload,
            Api::Send => &mut self.send,
        }
    }

    /// Checks that every rate is a share and that a spike slows calls down.
    pub fn validate(&self) -> Result<(), String> {
        self.upload.validate("upload")?;
        self.send.validate("send")?;
        if !(self.spike_factor.is_finite() && self.spike_factor >= 1.0) {
            return Err(format!("spike_factor is {}, it must be at least 1", self.spike_factor));
        }
        Ok(())
    }
}

/// Durations as whole milliseconds in JSON.
mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Parses a duration such as `250ms`, `50us`, `2s`, `1.5s`, `3m` or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{text}` has no unit (ns, us, ms, s, m)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("`{text}` does not start with a number"))?;
    let seconds_per_unit = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        other => return Err(format!("`{other}` is not a duration unit (ns, us, ms, s, m)")),
    };
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|e| format!("`{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("12").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn rates_outside_zero_to_one_or_summing_above_one_are_refused() {
        let mut faults = Faults::both(FaultRates {
            error: 0.5,
            rate_limit: 0.4,
            timeout_after_accept: 0.1,
            latency_spike: 1.0,
        });
        assert_eq!(faults.validate(), Ok(()));
        faults.send.error = 0.6;
        assert!(faults.validate().unwrap_err().contains("send"));
        faults.send.error = -0.1;
        assert!(faults.validate().is_err());
        let faults = Faults { spike_factor: 0.5, ..Faults::none() };
        assert!(faults.validate().is_err());
    }

    #[test]
    fn faults_round_trip_through_json_with_the_hold_in_milliseconds() {
        let faults = Faults {
            timeout_hold: Duration::from_millis(1500),
            ..Faults::only(Api::Send, FaultRates { timeout_after_accept: 0.25, ..FaultRates::default() })
        };
        let json = serde_json::to_value(&faults).unwrap();
        assert_eq!(json["timeout_hold_ms"], 1500);
        assert_eq!(json["send"]["timeout_after_accept"], 0.25);
        assert_eq!(serde_json::from_value::<Faults>(json).unwrap(), faults);
        let partial: Faults = serde_json::from_str(r#"{"upload":{"error":0.1}}"#).unwrap();
        assert_eq!(partial.upload.error, 0.1);
        assert_eq!(partial.spike_factor, 10.0);
    }

    #[test]
    fn a_rate_below_one_call_a_second_is_refused() {
        let with = |rate| EspSimConfig { calls_per_second: Some(rate), ..EspSimConfig::default() };
        assert_eq!(with(1.0).validate(), Ok(()));
        assert_eq!(with(20.5).validate(), Ok(()));
        assert!(with(0.5).validate().unwrap_err().contains("calls_per_second"));
        assert!(with(f64::NAN).validate().is_err());
        assert!(with(f64::INFINITY).validate().is_err());
    }

    #[test]
    fn latency_grows_with_the_list() {
        let config = EspSimConfig::default();
        assert_eq!(config.latency(Api::Upload, 10_000), Duration::from_millis(700));
        assert_eq!(config.latency(Api::Send, 0), Duration::from_millis(100));
    }
}
