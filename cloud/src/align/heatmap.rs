//! The similarity matrix as a PNG heat map: SLM layers down, LLM layers across, the chosen map outlined in white;
//! ticks every four layers on the left and top edges.

use std::path::Path;

const CELL: usize = 16;
const MARGIN: usize = 8;

/// A perceptual dark-blue → green → yellow ramp (viridis' end points and middle).
fn colour(t: f64) -> [u8; 3] {
    let stops = [
        [68.0, 1.0, 84.0],
        [33.0, 145.0, 140.0],
        [253.0, 231.0, 37.0],
    ];
    let t = t.clamp(0.0, 1.0) * 2.0;
    let (a, b, f) = if t < 1.0 {
        (stops[0], stops[1], t)
    } else {
        (stops[1], stops[2], t - 1.0)
    };
    [0, 1, 2].map(|i| (a[i] + (b[i] - a[i]) * f) as u8)
}

/// Writes `sim` (`[row][column]`, values in 0..=1) with `map[row]` outlined.
pub fn write(path: &Path, sim: &[Vec<f64>], map: &[usize]) -> anyhow::Result<()> {
    let (rows, cols) = (sim.len(), sim.first().map_or(0, Vec::len));
    let (w, h) = (2 * MARGIN + cols * CELL, 2 * MARGIN + rows * CELL);
    let mut px = vec![255u8; w * h * 3];
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        let i = (y * w + x) * 3;
        px[i..i + 3].copy_from_slice(&c);
    };
    for (r, row) in sim.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let outlined = map.get(r) == Some(&c);
            for dy in 0..CELL {
                for dx in 0..CELL {
                    let edge = dx < 2 || dy < 2 || dx >= CELL - 2 || dy >= CELL - 2;
                    let fill = if outlined && edge {
                        [255, 255, 255]
                    } else {
                        colour(v)
                    };
                    put(MARGIN + c * CELL + dx, MARGIN + r * CELL + dy, fill);
                }
            }
        }
    }
    for c in (0..cols).step_by(4) {
        for y in 2..MARGIN - 1 {
            put(MARGIN + c * CELL + CELL / 2, y, [0, 0, 0]);
        }
    }
    for r in (0..rows).step_by(4) {
        for x in 2..MARGIN - 1 {
            put(x, MARGIN + r * CELL + CELL / 2, [0, 0, 0]);
        }
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&px)?;
    Ok(())
}
