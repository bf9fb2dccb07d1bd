//! `BENCHMARKS.md`: the run's tables, its targets, and the physical limits beside the numbers.

use std::fmt::Write as _;

use super::results::Results;
use super::systems::System;

const MB: f64 = 1e6;

/// The throughput comparison of the issue: the p99 bound is cloud-only's own p99 at the smallest load of 16+ users;
/// each system's best requests/s at 16+ users within it.
pub struct ThroughputTarget {
    pub users: usize,
    pub bound_s: f64,
    pub cloud_rps: f64,
    pub tandem_rps: Option<(usize, f64, f64)>,
}

pub fn throughput_target(r: &Results) -> Option<ThroughputTarget> {
    let cloud = r
        .concurrency
        .iter()
        .filter(|c| c.system == System::CloudOnly && c.users >= 16)
        .min_by_key(|c| c.users)?;
    let bound_s = cloud.e2e(0.99);
    let tandem = r
        .concurrency
        .iter()
        .filter(|c| c.system == System::TandemFull && c.users >= 16 && c.e2e(0.99) <= bound_s)
        .max_by(|a, b| a.rps().total_cmp(&b.rps()))
        .map(|c| (c.users, c.rps(), c.e2e(0.99)));
    Some(ThroughputTarget {
        users: cloud.users,
        bound_s,
        cloud_rps: cloud.rps(),
        tandem_rps: tandem,
    })
}

/// The TTFT comparison of the issue: edge-only vs tandem full on 5G with a 2k context (or the run's nearest).
pub fn ttft_target(r: &Results) -> Option<(String, usize, f64, f64)> {
    let link = r
        .profiles
        .iter()
        .find(|p| p.name == "5G")
        .unwrap_or(r.profiles.first()?)
        .name;
    let ctx = *r
        .context_lengths
        .iter()
        .min_by_key(|&&c| c.abs_diff(2048))?;
    let edge = r.median(System::EdgeOnly, link, ctx, |s| s.ttft_s);
    let tandem = r.median(System::TandemFull, link, ctx, |s| s.ttft_s);
    (edge.is_finite() && tandem.is_finite()).then(|| (link.to_string(), ctx, edge, tandem))
}

fn yes(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**not met**" }
}

pub fn markdown(r: &Results) -> String {
    let mut m = String::new();
    let w = &mut m;
    let _ = writeln!(w, "# tandem benchmarks\n");
    let _ = writeln!(
        w,
        "Written by `{}` in one run of {:.1} min on this project's development machine: {} cores ({}), measured memory \
         bandwidth {:.1} GB/s. Model: {} ({:.0} MB of weights) on every edge and in the cloud. Links: {}. The cloud \
         is its own process (`tandem serve`); edges are threads of the bench process on the same cores. Greedy \
         decoding, answers of fixed length (`ignore_eos`).\n",
        r.command,
        r.wall_s / 60.0,
        r.machine.cores,
        r.machine.cpu,
        r.machine.memory_bandwidth_bytes_per_s / 1e9,
        r.model,
        r.weights_bytes as f64 / MB,
        r.link_emulation,
    );
    if r.quick {
        let _ = writeln!(
            w,
            "*A `--quick` run: small model, short context, few users. Not the numbers to quote.*\n"
        );
    }

    let _ = writeln!(
        w,
        "## Targets\n\n| target | measured | |\n| --- | --- | --- |"
    );
    if let Some((link, ctx, edge, tandem)) = ttft_target(r) {
        let _ = writeln!(
            w,
            "| TTFT vs edge-only at {link}, {ctx}-token context: ≥ 10× lower | edge-only {edge:.2} s, tandem {tandem:.3} s: **{:.1}×** | {} |",
            edge / tandem,
            yes(edge / tandem >= 10.0)
        );
    }
    if let Some(t) = throughput_target(r) {
        let measured = match t.tandem_rps {
            Some((users, rps, p99)) => format!(
                "p99 bound {:.1} s (cloud-only's p99 at {} users); cloud-only {:.2} req/s, tandem {:.2} req/s at {users} users (p99 {p99:.1} s): **{:.1}×**",
                t.bound_s,
                t.users,
                t.cloud_rps,
                rps,
                rps / t.cloud_rps
            ),
            None => format!(
                "tandem has no run at 16+ users within cloud-only's p99 of {:.1} s",
                t.bound_s
            ),
        };
        let met = t
            .tandem_rps
            .is_some_and(|(_, rps, _)| rps >= 4.0 * t.cloud_rps);
        let _ = writeln!(
            w,
            "| requests/s vs cloud-only at 16+ users within the same p99 bound: ≥ 4× | {measured} | {} |",
            yes(met)
        );
    }
    let (ok, n) = r.success();
    let rate = ok as f64 / n.max(1) as f64;
    let _ = writeln!(
        w,
        "| success over the whole run: ≥ 99.99% | {ok} of {n} requests: **{:.2}%** ({} answered from a local fallback) | {} |\n",
        rate * 100.0,
        r.fallbacks(),
        yes(rate >= 0.9999)
    );

    let _ = writeln!(w, "## One user at a time\n");
    let _ = writeln!(
        w,
        "Median of the runs per cell. *KV on the wire*: context KV payload; *link floor*: one RTT plus those bytes at the \
         link's rate, the least any loader could take; *KV done*: when the last layer had arrived. Where the link is slow \
         enough, the cloud leaves the lowest layers to the edge, which computes them while the others stream (the \
         codec column says how many). Edge-only never \
         touches the network (the same runs are shown under every link). Cloud CPU: the cloud process's CPU seconds \
         during the request.\n"
    );
    for p in &r.profiles {
        let _ = writeln!(w, "### {}\n", heading(r, p));
        let _ = writeln!(
            w,
            "| context | system | TTFT s | time/token ms | end-to-end s | KV on the wire MB | codec | link floor s | KV done s | cloud CPU s |\n| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"
        );
        for &ctx in &r.context_lengths {
            for sys in System::ALL {
                let cell = r.cell(sys, p.name, ctx);
                if cell.is_empty() {
                    let _ = writeln!(w, "| {ctx} | {} | — | | | | | | | |", sys.label());
                    continue;
                }
                let med =
                    |f: &dyn Fn(&super::systems::Sample) -> f64| r.median(sys, p.name, ctx, f);
                let bytes = med(&|s| s.kv_bytes as f64);
                let (floor, done) = if bytes > 0.0 {
                    (
                        format!("{:.3}", p.wire_time_s(bytes)),
                        format!("{:.3}", med(&|s| s.kv_done_s)),
                    )
                } else {
                    (String::new(), String::new())
                };
                let _ = writeln!(
                    w,
                    "| {ctx} | {} | {:.3} | {:.1} | {:.2} | {} | {} | {floor} | {done} | {:.2} |",
                    sys.label(),
                    med(&|s| s.ttft_s),
                    med(&|s| s.tpot_s) * 1e3,
                    med(&|s| s.e2e_s),
                    if bytes > 0.0 {
                        format!("{:.2}", bytes / MB)
                    } else {
                        String::new()
                    },
                    match (&cell[0].codec, cell[0].local_layers) {
                        (Some(c), 0) => c.clone(),
                        (Some(c), k) => format!("{c}, lowest {k} layers computed on the edge"),
                        (None, _) => String::new(),
                    },
                    med(&|s| s.cloud_cpu_s),
                );
            }
        }
        let _ = writeln!(w);
    }

    let _ = writeln!(w, "## Many users\n");
    let _ = writeln!(
        w,
        "{} concurrent edges, each on its own {} link, one request each (prompts and answers of random length, \
         seeded), against one cloud. Cloud-only is real end to end: the cloud prefills each prompt against the \
         context's cached KV and decodes every answer. In tandem the cloud's part (KV streamed from its cache) and \
         the links are real and concurrent, while each edge's own prompt prefill and decode — which run on the \
         user's device, not here — take the time one edge measured on this machine \
         ({}), counted after its last KV layer arrived (no credit for pipelining): 64 edge devices do not fit on {} \
         cores.\n",
        r.concurrency.iter().map(|c| c.users).max().unwrap_or(0),
        r.concurrency_link,
        r.edge_rates.map_or(String::new(), |e| format!(
            "prompt {:.0} tokens/s, decode {:.1} ms/token",
            e.prefill_tokens_per_s,
            e.seconds_per_token * 1e3
        )),
        r.machine.cores,
    );
    let _ = writeln!(
        w,
        "| edges | system | requests/s | e2e p50 s | e2e p95 s | e2e p99 s | TTFT p50 s | TTFT p99 s | success | cloud CPU s/request |\n| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for c in &r.concurrency {
        let _ = writeln!(
            w,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {}/{} | {:.3} |",
            c.users,
            c.system.label(),
            c.rps(),
            c.e2e(0.5),
            c.e2e(0.95),
            c.e2e(0.99),
            c.ttft(0.5),
            c.ttft(0.99),
            c.succeeded(),
            c.samples.len(),
            c.cloud_cpu_s / c.samples.len().max(1) as f64
        );
    }
    let _ = writeln!(w);

    let _ = writeln!(
        w,
        "## Context KV per codec\n\n| context | codec | bytes/token | fp16 size ÷ this |\n| ---: | --- | ---: | ---: |"
    );
    for c in &r.codecs {
        let _ = writeln!(
            w,
            "| {} | {} | {:.0} | {:.2}× |",
            c.context_tokens,
            c.codec,
            c.bytes as f64 / c.context_tokens as f64,
            c.fp16_bytes as f64 / c.bytes as f64
        );
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## Physical limits\n");
    let bound = r.machine.memory_bandwidth_bytes_per_s / r.weights_bytes as f64;
    let small = r.context_lengths[0];
    let tpot = r.median(System::EdgeOnly, "", small, |s| s.tpot_s);
    let _ = writeln!(
        w,
        "- Decode reads every weight once per token: at the measured {:.1} GB/s, {:.0} MB of weights bound decode at \
         **{bound:.0} tokens/s**; the edge decoded at {:.0} tokens/s ({:.0}% of that bound) with a {small}-token context.",
        r.machine.memory_bandwidth_bytes_per_s / 1e9,
        r.weights_bytes as f64 / MB,
        1.0 / tpot,
        100.0 / tpot / bound
    );
    let _ = writeln!(
        w,
        "- Loading context KV can take no less than the link floor in the tables above (one RTT + bytes at line rate); \
         the *KV done* column is what the pipelined loader took, decoding included."
    );
    let _ = writeln!(
        w,
        "- The cloud prefilled each context once: {}. Its peak resident memory over the run: {:.0} MB.\n",
        r.cloud_prefill_s
            .iter()
            .map(|(n, s)| format!("{n} tokens in {s:.1} s"))
            .collect::<Vec<_>>()
            .join(", "),
        r.cloud_peak_rss_bytes as f64 / MB
    );

    let _ = writeln!(w, "## Plots\n");
    let _ = writeln!(
        w,
        "![TTFT vs context length per link](bench/ttft_vs_context.png)\n"
    );
    let _ = writeln!(
        w,
        "![Requests per second vs concurrent edges](bench/throughput_vs_concurrency.png)\n"
    );
    let _ = writeln!(
        w,
        "![Bytes per context token per codec](bench/bytes_per_codec.png)\n"
    );

    let _ = writeln!(w, "## Not measured here\n");
    let mut notes = vec![
        "The aligned-LLM mode (cloud LLM KV projected into the edge SLM) does not exist yet; it joins these tables when it does.".to_string(),
    ];
    if !r.loss_emulated {
        notes.push("Packet loss: the in-process shaper cannot drop packets, so the `poor` link has its rate and delay but no loss.".into());
    }
    notes.extend(r.notes.iter().cloned());
    for n in notes {
        let _ = writeln!(w, "- {n}");
    }
    m
}

/// A profile as the run had it: its loss named only where it was emulated.
pub fn heading(r: &Results, p: &super::links::Profile) -> String {
    if p.loss_pct > 0.0 && !r.loss_emulated {
        format!("{} — loss not emulated", p.describe())
    } else {
        p.describe()
    }
}
