//! The workloads, each run against one store endpoint. Every function opens its own
//! connections, so one store's results never depend on connections made for another workload.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{Client, GetOptions, WatchOptions};
use futures::future::try_join_all;

use crate::stats::{Percentiles, percentiles};

/// Sizes of one run; `quick()` is a smoke run, `full()` the real thing.
#[derive(Debug, Clone)]
pub struct Params {
    /// How long each put-throughput workload runs.
    pub put_duration: Duration,
    /// The concurrency levels of the put workload; each client has its own connection.
    pub put_clients: Vec<usize>,
    /// Size of every value written.
    pub value_size: usize,
    /// Keys under the range prefix.
    pub range_keys: usize,
    /// Sequential single-key gets measured.
    pub single_gets: usize,
    /// Sequential full-prefix ranges measured.
    pub prefix_ranges: usize,
    /// Watchers on the watch prefix, each on its own connection.
    pub watchers: usize,
    /// Puts whose delivery to every watcher is measured.
    pub watch_puts: usize,
    /// Pause between two measured watch puts, so the latency is not queueing behind a burst.
    pub watch_interval: Duration,
}

impl Params {
    pub fn quick() -> Self {
        Params {
            put_duration: Duration::from_millis(700),
            put_clients: vec![1, 16, 64],
            value_size: 1024,
            range_keys: 1000,
            single_gets: 300,
            prefix_ranges: 20,
            watchers: 100,
            watch_puts: 20,
            watch_interval: Duration::from_millis(10),
        }
    }

    pub fn full() -> Self {
        Params {
            put_duration: Duration::from_secs(5),
            put_clients: vec![1, 16, 64],
            value_size: 1024,
            range_keys: 1000,
            single_gets: 5000,
            prefix_ranges: 300,
            watchers: 100,
            watch_puts: 300,
            watch_interval: Duration::from_millis(10),
        }
    }
}

/// One measured number of one store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Metric {
    /// Stable identifier, e.g. `put_per_sec_c16`.
    pub id: String,
    /// What a reader sees in the table.
    pub label: String,
    pub unit: &'static str,
    /// Whether a higher value is better (throughput) or a lower one (latency, memory).
    pub higher_is_better: bool,
    pub value: f64,
}

fn metric(id: &str, label: &str, unit: &'static str, higher_is_better: bool, value: f64) -> Metric {
    Metric {
        id: id.to_owned(),
        label: label.to_owned(),
        unit,
        higher_is_better,
        value,
    }
}

async fn connect(endpoint: &str) -> Result<Client> {
    Client::connect([endpoint], None)
        .await
        .with_context(|| format!("connecting to {endpoint}"))
}

fn value_of(size: usize, tag: usize) -> Vec<u8> {
    // Not all the same byte, so no layer can get away with trivially compressing it.
    (0..size).map(|i| b'a' + ((i + tag) % 26) as u8).collect()
}

/// The store under test: one member or several. Clients are spread over the members (client
/// `i` talks to member `i mod n`), CPU is summed over them, memory is the largest member's.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoints: Vec<String>,
    pub pids: Vec<u32>,
}

impl Target {
    fn endpoint(&self, i: usize) -> &str {
        &self.endpoints[i % self.endpoints.len()]
    }

    fn cpu_seconds(&self) -> Result<f64> {
        self.pids.iter().map(|&pid| cpu_seconds(pid)).sum()
    }

    fn resident_mib(&self) -> Result<f64> {
        self.pids
            .iter()
            .map(|&pid| resident_mib(pid))
            .try_fold(0.0, |max, rss| rss.map(|r| f64::max(max, r)))
    }
}

/// Runs every workload against `target` and returns the metrics in table order: the
/// members' CPU time is read around each put workload, their resident memory at the end.
pub async fn run_all(target: &Target, params: &Params) -> Result<Vec<Metric>> {
    let mut out = Vec::new();

    let mut cpu = Vec::new();
    for &clients in &params.put_clients {
        let put = put_throughput(target, clients, params)
            .await
            .with_context(|| format!("put workload with {clients} clients"))?;
        let noun = if clients == 1 { "client" } else { "clients" };
        out.push(metric(
            &format!("put_per_sec_c{clients}"),
            &format!("put/s, {clients} {noun}"),
            "ops/s",
            true,
            put.rate,
        ));
        cpu.push(metric(
            &format!("put_cpu_s_per_10k_c{clients}"),
            &format!("server CPU per 10k puts, {clients} {noun}"),
            "s",
            false,
            put.cpu_seconds_per_10k,
        ));
    }
    out.extend(cpu);

    let (single, prefix) = range_latency(target, params)
        .await
        .context("range workload")?;
    out.push(metric(
        "get_p50_ms",
        "get 1 key p50",
        "ms",
        false,
        single.p50_ms,
    ));
    out.push(metric(
        "get_p99_ms",
        "get 1 key p99",
        "ms",
        false,
        single.p99_ms,
    ));
    let n = params.range_keys;
    out.push(metric(
        "range_p50_ms",
        &format!("range {n} keys p50"),
        "ms",
        false,
        prefix.p50_ms,
    ));
    out.push(metric(
        "range_p99_ms",
        &format!("range {n} keys p99"),
        "ms",
        false,
        prefix.p99_ms,
    ));

    let watch = watch_latency(target, params)
        .await
        .context("watch workload")?;
    let w = params.watchers;
    out.push(metric(
        "watch_p50_ms",
        &format!("watch delivery p50 ({w} watchers)"),
        "ms",
        false,
        watch.p50_ms,
    ));
    out.push(metric(
        "watch_p99_ms",
        &format!("watch delivery p99 ({w} watchers)"),
        "ms",
        false,
        watch.p99_ms,
    ));

    let rss = target
        .resident_mib()
        .context("reading the server's resident memory")?;
    let label = if target.pids.len() > 1 {
        "server RSS after run (largest member)"
    } else {
        "server RSS after run"
    };
    out.push(metric("rss_mib", label, "MiB", false, rss));
    Ok(out)
}

/// What one put workload measured.
struct PutResult {
    /// Acknowledged puts per second.
    rate: f64,
    /// Server CPU (user + system, all threads) spent per 10 000 acknowledged puts.
    cpu_seconds_per_10k: f64,
}

/// Puts with `clients` concurrent clients, each on its own connection, for
/// `params.put_duration`; also reads the members' CPU time around the timed part.
async fn put_throughput(target: &Target, clients: usize, params: &Params) -> Result<PutResult> {
    let value = Arc::new(value_of(params.value_size, clients));
    let mut conns = Vec::with_capacity(clients);
    for c in 0..clients {
        let mut client = connect(target.endpoint(c)).await?;
        // One warm-up put per connection: connection setup is not what we measure.
        client
            .put(
                format!("bench/put/c{clients}/warm/{c}"),
                value.to_vec(),
                None,
            )
            .await?;
        conns.push(client);
    }

    let cpu_before = target
        .cpu_seconds()
        .context("reading the server's CPU time")?;
    let start = Instant::now();
    let deadline = start + params.put_duration;
    let tasks = conns.into_iter().enumerate().map(|(c, mut client)| {
        let value = Arc::clone(&value);
        tokio::spawn(async move {
            let mut n: u64 = 0;
            while Instant::now() < deadline {
                let key = format!("bench/put/c{clients}/{c}/{n}");
                client.put(key, value.to_vec(), None).await?;
                n += 1;
            }
            Ok::<_, anyhow::Error>((n, Instant::now()))
        })
    });
    let results = try_join_all(tasks).await.context("put task panicked")?;
    let mut total = 0u64;
    let mut end = deadline;
    for r in results {
        let (n, finished) = r?;
        total += n;
        end = end.max(finished);
    }
    let cpu = target
        .cpu_seconds()
        .context("reading the server's CPU time")?
        - cpu_before;
    ensure!(total > 0, "no put was acknowledged");
    Ok(PutResult {
        rate: total as f64 / (end - start).as_secs_f64(),
        cpu_seconds_per_10k: cpu * 10_000.0 / total as f64,
    })
}

/// Preloads `range_keys` keys, then measures sequential single-key gets and full-prefix ranges.
async fn range_latency(target: &Target, params: &Params) -> Result<(Percentiles, Percentiles)> {
    const PREFIX: &str = "bench/range/";
    let n = params.range_keys;
    let mut client = connect(target.endpoint(0)).await?;

    let loaders = 8;
    let tasks = (0..loaders).map(|l| {
        let mut client = client.clone();
        let value = value_of(params.value_size, l);
        tokio::spawn(async move {
            for i in (l..n).step_by(loaders) {
                client
                    .put(format!("{PREFIX}{i:06}"), value.clone(), None)
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        })
    });
    for r in try_join_all(tasks).await.context("preload task panicked")? {
        r?;
    }

    let mut single = Vec::with_capacity(params.single_gets);
    for i in 0..params.single_gets {
        let key = format!("{PREFIX}{:06}", (i * 7919) % n);
        let t = Instant::now();
        let resp = client.get(key.as_str(), None).await?;
        single.push(t.elapsed());
        ensure!(
            resp.kvs().len() == 1,
            "get {key} returned {} kvs",
            resp.kvs().len()
        );
    }

    let mut prefix = Vec::with_capacity(params.prefix_ranges);
    for _ in 0..params.prefix_ranges {
        let t = Instant::now();
        let resp = client
            .get(PREFIX, Some(GetOptions::new().with_prefix()))
            .await?;
        prefix.push(t.elapsed());
        ensure!(
            resp.kvs().len() == n,
            "prefix range returned {} kvs, expected {n}",
            resp.kvs().len()
        );
    }
    Ok((percentiles(single), percentiles(prefix)))
}

/// `params.watchers` watchers (each on its own connection) watch one prefix; a writer puts
/// `params.watch_puts` keys one at a time. Each sample is the time from just before a put is
/// sent to the moment one watcher receives its event.
async fn watch_latency(target: &Target, params: &Params) -> Result<Percentiles> {
    const PREFIX: &str = "bench/watch/";
    let puts = params.watch_puts;
    let mut writer = connect(target.endpoint(0)).await?;
    let start_rev = writer
        .get(PREFIX, None)
        .await?
        .header()
        .context("range response without header")?
        .revision()
        + 1;
    let sent: Arc<Vec<OnceLock<Instant>>> = Arc::new((0..puts).map(|_| OnceLock::new()).collect());

    let mut watchers = Vec::with_capacity(params.watchers);
    for w in 0..params.watchers {
        let mut client = connect(target.endpoint(w)).await?;
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_rev);
        let mut stream = client.watch(PREFIX, Some(opts)).await?;
        let created = stream
            .message()
            .await?
            .with_context(|| format!("watch stream {w} closed before it was created"))?;
        ensure!(
            created.created(),
            "first watch response of watcher {w} is not 'created'"
        );
        let sent = Arc::clone(&sent);
        watchers.push(tokio::spawn(async move {
            // Keep the connection alive while we read.
            let _client = client;
            let mut samples = Vec::with_capacity(puts);
            while samples.len() < puts {
                let Some(resp) = stream.message().await? else {
                    bail!("watch stream {w} ended after {} events", samples.len());
                };
                let now = Instant::now();
                ensure!(
                    !resp.canceled(),
                    "watch {w} canceled: {}",
                    resp.cancel_reason()
                );
                for ev in resp.events() {
                    let kv = ev.kv().context("event without kv")?;
                    let idx: usize = std::str::from_utf8(&kv.key()[PREFIX.len()..])?.parse()?;
                    let sent_at = sent
                        .get(idx)
                        .and_then(OnceLock::get)
                        .with_context(|| format!("event for key {idx} that was never sent"))?;
                    samples.push(now - *sent_at);
                }
            }
            Ok(samples)
        }));
    }

    let value = value_of(params.value_size, 3);
    for (i, slot) in sent.iter().enumerate() {
        let _ = slot.set(Instant::now());
        writer
            .put(format!("{PREFIX}{i:06}"), value.clone(), None)
            .await?;
        tokio::time::sleep(params.watch_interval).await;
    }

    let all = tokio::time::timeout(Duration::from_secs(30), try_join_all(watchers))
        .await
        .context("watchers did not receive every event within 30 s")?
        .context("watcher task panicked")?;
    let mut samples = Vec::with_capacity(puts * params.watchers);
    for r in all {
        samples.extend(r?);
    }
    Ok(percentiles(samples))
}

/// User plus system CPU time of a process and all its threads, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    /// The unit of `/proc/PID/stat` times: `USER_HZ`, 100 on every Linux ABI we run on.
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no ')' in /proc/PID/stat")?;
    // After the name: state is field 3, so utime (14) and stime (15) are the 12th and 13th.
    let mut fields = rest.split_whitespace().skip(11);
    let mut tick = || -> Result<f64> {
        Ok(fields
            .next()
            .context("/proc/PID/stat is too short")?
            .parse::<u64>()? as f64)
    };
    let ticks = tick()? + tick()?;
    Ok(ticks / TICKS_PER_SECOND)
}

/// VmRSS of a process, in MiB.
pub fn resident_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line in /proc/PID/status")?;
    let kib: f64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}
