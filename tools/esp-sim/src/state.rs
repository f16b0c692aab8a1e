//! The simulator's shared state: configuration, the per-API slot accounting and fault
//! dice, the calls-per-second limit, and the ledger.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Api, EspSimConfig, FaultRates, Faults};
use crate::ledger::Ledger;
use crate::rate::RateLimiter;
use crate::report::{ApiReport, CallSpan, FaultCounts, LimitChange, SimReport, TimelinePoint};

/// Unix time from a monotonic clock, so that the timeline never goes backwards.
#[derive(Debug)]
pub(crate) struct Clock {
    started_at: DateTime<Utc>,
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        Self { started_at: Utc::now(), start: Instant::now() }
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        let elapsed = chrono::Duration::from_std(self.start.elapsed()).unwrap_or(chrono::Duration::MAX);
        self.started_at + elapsed
    }

    /// Unix microseconds.
    fn now_us(&self) -> i64 {
        self.now().timestamp_micros()
    }
}

pub(crate) struct SimState {
    pub(crate) config: EspSimConfig,
    pub(crate) clock: Clock,
    faults: Mutex<Faults>,
    upload: Mutex<ApiState>,
    send: Mutex<ApiState>,
    /// Over uploads and sends together, when a rate is set. Locked inside an API's lock.
    rate: Option<Mutex<RateLimiter>>,
    pub(crate) ledger: Mutex<Ledger>,
    /// Cancelled when the simulator shuts down: withheld answers give up waiting.
    pub(crate) shutdown: CancellationToken,
}

/// One API's slots, counters and dice.
struct ApiState {
    limit: u32,
    rng: StdRng,
    in_progress: u32,
    peak: u32,
    accepted: u64,
    completed: u64,
    over_limit: u64,
    invalid: u64,
    injected: FaultCounts,
    busy_slot_us: u128,
    last_change_us: i64,
    service: Duration,
    timeline: Vec<TimelinePoint>,
    calls: Vec<CallSpan>,
    /// Every change of `limit` after start.
    limit_changes: Vec<LimitChange>,
    /// The limit at start, which the report gives as `limit`.
    initial_limit: u32,
}

impl ApiState {
    fn new(limit: u32, seed: u64, now_us: i64) -> Self {
        Self {
            limit,
            rng: StdRng::seed_from_u64(seed),
            in_progress: 0,
            peak: 0,
            accepted: 0,
            completed: 0,
            over_limit: 0,
            invalid: 0,
            injected: FaultCounts::default(),
            busy_slot_us: 0,
            last_change_us: now_us,
            service: Duration::ZERO,
            timeline: Vec::new(),
            calls: Vec::new(),
            limit_changes: Vec::new(),
            initial_limit: limit,
        }
    }

    fn change(&mut self, now_us: i64, up: bool) {
        let elapsed = u128::try_from(now_us - self.last_change_us).unwrap_or(0);
        self.busy_slot_us += u128::from(self.in_progress) * elapsed;
        self.last_change_us = now_us;
        if up {
            self.in_progress += 1;
            self.peak = self.peak.max(self.in_progress);
        } else {
            self.in_progress -= 1;
        }
        self.timeline.push(TimelinePoint { at_ms: now_us as f64 / 1000.0, in_progress: self.in_progress });
    }

    fn report(&self, now_us: i64, with_timeline: bool) -> ApiReport {
        let elapsed = u128::try_from(now_us - self.last_change_us).unwrap_or(0);
        let busy_us = self.busy_slot_us + u128::from(self.in_progress) * elapsed;
        ApiReport {
            limit: self.initial_limit,
            limit_changes: self.limit_changes.clone(),
            calls_accepted: self.accepted,
            calls_completed: self.completed,
            over_limit_attempts: self.over_limit,
            invalid_calls: self.invalid,
            injected: self.injected,
            in_progress: self.in_progress,
            peak_concurrency: self.peak,
            busy_slot_seconds: busy_us as f64 / 1e6,
            service_seconds: self.service.as_secs_f64(),
            timeline: if with_timeline { self.timeline.clone() } else { Vec::new() },
            calls: if with_timeline { self.calls.clone() } else { Vec::new() },
        }
    }
}

/// Why a call was turned away without doing any work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Answer 500, do nothing.
    InjectedError,
    /// Answer 429, do nothing (injected, not over the limit).
    InjectedRateLimit,
    /// Answer 429: `limit` calls were already in progress.
    OverLimit,
    /// Answer 429: the last second already held `floor(calls_per_second)` accepted calls.
    OverRate,
}

/// How an admitted call behaves.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) latency: Duration,
    /// Withhold the answer for this long, then drop the connection.
    pub(crate) withhold: Option<Duration>,
}

/// A call in progress. Dropping it frees the slot.
pub(crate) struct Slot {
    state: Arc<SimState>,
    api: Api,
    latency: Duration,
    /// Its place in the API's `calls`.
    call: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let now_us = self.state.clock.now_us();
        let mut api = self.state.api(self.api);
        api.completed += 1;
        api.service += self.latency;
        api.change(now_us, false);
        if let Some(call) = api.calls.get_mut(self.call) {
            call.end_ms = Some(now_us as f64 / 1000.0);
        }
    }
}

impl SimState {
    pub(crate) fn new(config: EspSimConfig) -> Self {
        let clock = Clock::new();
        let now_us = clock.now_us();
        Self {
            faults: Mutex::new(config.faults.clone()),
            upload: Mutex::new(ApiState::new(config.upload_limit, config.seed, now_us)),
            send: Mutex::new(ApiState::new(config.send_limit, config.seed ^ 0x5EED_5EED_5EED_5EED, now_us)),
            rate: config.calls_per_second.map(|limit| Mutex::new(RateLimiter::new(limit))),
            ledger: Mutex::new(Ledger::new(config.keep_addresses_max)),
            shutdown: CancellationToken::new(),
            clock,
            config,
        }
    }

    fn api(&self, api: Api) -> MutexGuard<'_, ApiState> {
        lock(match api {
            Api::Upload => &self.upload,
            Api::Send => &self.send,
        })
    }

    pub(crate) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    pub(crate) fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    pub(crate) fn set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        *lock(&self.faults) = faults;
        Ok(())
    }

    /// Changes the number of calls of `api` allowed in progress at once, from the next call on:
    /// calls already in progress above a lowered limit finish, and new ones are refused until
    /// fewer than `limit` are left. The report keeps the limit at start and every change.
    pub(crate) fn set_limit(&self, api: Api, limit: u32) -> Result<(), String> {
        if limit == 0 {
            return Err("a limit must be at least 1".into());
        }
        let now_us = self.clock.now_us();
        let mut state = self.api(api);
        state.limit = limit;
        state.limit_changes.push(LimitChange { at_ms: now_us as f64 / 1000.0, limit });
        Ok(())
    }

    /// Counts a call refused before any work (bad credentials, bad body, unknown list).
    pub(crate) fn invalid_call(&self, api: Api) {
        self.api(api).invalid += 1;
    }

    /// Rolls the fault dice for a call of `api` for `request_id` over `recipients` recipients, then, if the
    /// rate (uploads and sends together) has room, takes a slot if one is free (the slot is
    /// held until the returned [`Slot`] is dropped). Every call rolls the same dice, so a
    /// seeded run repeats.
    pub(crate) fn admit(
        self: &Arc<Self>,
        api: Api,
        request_id: &str,
        recipients: usize,
    ) -> Result<(Slot, Plan), Refusal> {
        let (rates, spike_factor, hold): (FaultRates, f64, Duration) = {
            let faults = lock(&self.faults);
            (*faults.rates(api), faults.spike_factor, faults.timeout_hold)
        };
        let mut state = self.api(api);
        let fault: f64 = state.rng.random();
        let spike: f64 = state.rng.random();
        // Held to the end, so that the room found is the room taken.
        let mut rate = self.rate.as_ref().map(lock);
        if let Some(rate) = &mut rate {
            rate.attempt();
        }
        if fault < rates.error {
            state.injected.error += 1;
            return Err(Refusal::InjectedError);
        }
        if fault < rates.error + rates.rate_limit {
            state.injected.rate_limit += 1;
            return Err(Refusal::InjectedRateLimit);
        }
        let now_us = self.clock.now_us();
        if let Some(rate) = &mut rate
            && !rate.has_room(now_us)
        {
            rate.refuse();
            return Err(Refusal::OverRate);
        }
        if state.in_progress >= state.limit {
            state.over_limit += 1;
            return Err(Refusal::OverLimit);
        }
        let timeout = fault < rates.error + rates.rate_limit + rates.timeout_after_accept;
        let spiked = spike < rates.latency_spike;
        let mut latency = self.config.latency(api, recipients);
        if spiked {
            state.injected.latency_spike += 1;
            latency = latency.mul_f64(spike_factor);
        }
        if timeout {
            state.injected.timeout_after_accept += 1;
        }
        if let Some(rate) = &mut rate {
            rate.accept(now_us);
        }
        drop(rate);
        state.accepted += 1;
        state.change(now_us, true);
        let call = state.calls.len();
        state.calls.push(CallSpan {
            request_id: request_id.to_owned(),
            recipients: recipients as u64,
            start_ms: now_us as f64 / 1000.0,
            end_ms: None,
        });
        drop(state);
        Ok((
            Slot { state: Arc::clone(self), api, latency, call },
            Plan { latency, withhold: timeout.then_some(hold) },
        ))
    }

    pub(crate) fn report(&self, with_timeline: bool) -> SimReport {
        let faults = self.faults();
        let (deliveries, requests) = {
            let ledger = self.ledger();
            (ledger.totals(), ledger.request_reports().collect())
        };
        let generated_at = self.clock.now();
        let now_us = generated_at.timestamp_micros();
        SimReport {
            started_at: self.clock.started_at,
            generated_at,
            upload: self.api(Api::Upload).report(now_us, with_timeline),
            send: self.api(Api::Send).report(now_us, with_timeline),
            deliveries,
            requests,
            faults,
            rate: self.rate.as_ref().map(|rate| lock(rate).report()),
        }
    }
}

/// Locks a mutex, carrying on after a panic elsewhere: every update here leaves the
/// counters consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
