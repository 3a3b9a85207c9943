//! A Rust process on one end of a memshare queue made by Python (or Rust).
//!
//! ```text
//! queue_peer produce <queue handle hex> <n>   puts n float64 arrays of shape (i + 1, 4),
//!                                             element [r, c] = i * 1000 + r * 4 + c
//! queue_peer consume <queue handle hex> <n>   gets n float64 arrays, prints "<shape> <sum>" each
//! queue_peer echo <in hex>,<out hex> <n>      gets n messages from one queue, puts each on the other
//!                                             (arrays in them too, by handle)
//! queue_peer ping <out hex>,<in hex> <n>      n round trips of an 8-byte message through an echo
//!                                             peer; prints "round trip <mean> us"
//! ```
//! The handle comes from `memshare.Queue`'s `_q.handle().hex()` (Python) or
//! `Queue::handle()` (Rust). Run it with the producer's `MEMSHARE_DIR`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use memshare::{Handle, Queue, SharedArray};
use ndarray::{ArrayD, IxDyn};

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn open_queue(handle: &str) -> memshare::Result<Queue> {
    let bytes = unhex(handle)
        .ok_or_else(|| memshare::Error::InvalidArgument("the handle must be hex".into()))?;
    Queue::from_handle(&Handle::from_bytes(&bytes)?)
}

fn run(mode: &str, handles: &str, n: usize) -> memshare::Result<()> {
    let queues = handles
        .split(',')
        .map(open_queue)
        .collect::<memshare::Result<Vec<_>>>()?;
    let timeout = Some(Duration::from_secs(60));
    match (mode, queues.as_slice()) {
        ("echo", [from, to]) => {
            for _ in 0..n {
                let msg = from.get_message(timeout)?;
                if memshare::message::is_message(msg.as_bytes()) {
                    // A message with a handle table (any Python object): its
                    // arrays travel on, pinned for the next queue.
                    to.put_blocks(msg.entries(), msg.payload(), timeout)?;
                } else {
                    to.put(msg.payload(), timeout)?;
                }
            }
        }
        ("ping", [to, from]) => {
            // The first round trip maps what it uses; the rest are timed.
            to.put(&0u64.to_le_bytes(), timeout)?;
            from.get(timeout)?;
            let t0 = Instant::now();
            for i in 1..n.max(2) as u64 {
                to.put(&i.to_le_bytes(), timeout)?;
                from.get(timeout)?;
            }
            let mean = t0.elapsed().as_secs_f64() / (n.max(2) - 1) as f64;
            println!("round trip {:.2} us", mean * 1e6);
        }
        ("produce", [q]) => {
            let arena = q.block().arena().clone();
            for i in 0..n {
                let a = ArrayD::from_shape_fn(IxDyn(&[i + 1, 4]), |ix| {
                    (i * 1000 + ix[0] * 4 + ix[1]) as f64
                });
                q.put_array(&SharedArray::from_view(&arena, a.view())?, timeout)?;
            }
        }
        ("consume", [q]) => {
            for _ in 0..n {
                let a = q.get_array(timeout)?;
                let sum: f64 = a.view::<f64>()?.sum();
                println!("{:?} {sum}", a.shape());
            }
        }
        _ => {
            return Err(memshare::Error::InvalidArgument(format!(
                "unknown mode {mode} or wrong number of queues: see the usage"
            )))
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!(
            "usage: queue_peer produce|consume <queue hex> <n>, or echo|ping <hex>,<hex> <n>"
        );
        return ExitCode::from(2);
    }
    let Ok(n) = args[3].parse::<usize>() else {
        eprintln!("n must be a number");
        return ExitCode::from(2);
    };
    match run(&args[1], &args[2], n) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
