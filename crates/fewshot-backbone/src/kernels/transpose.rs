//! Matrix transposes in square tiles, for the channels-last unfolding's
//! copies between (channel, pixel) and (pixel, channel) layouts.
//!
//! Transposed one value at a time, a matrix with long rows is written (or
//! read) one value per cache line, with a strided store per value: that was
//! ~10% of a second-order MAML task (`perf record` of `fewshot bench --suite
//! kernels --case maml2-1step-28`), and tiles halved it. The tiles move
//! scalars: an AVX version (eight registers, unpack and shuffle) measured no
//! faster, its time going to the loads of the source rows, which come from
//! memory.

use std::mem::MaybeUninit;

use candle_core::WithDType;

/// Side of the square tiles.
const TILE: usize = 8;

/// Writes a `rows` x `cols` matrix transposed: value (r, c), read at
/// `src[src_row(r) + c]`, goes to `dst[dst_row(c) + r]`.
pub(super) fn transpose<T: WithDType>(
    (rows, cols): (usize, usize),
    (src, src_row): (&[T], impl Fn(usize) -> usize),
    (dst, dst_row): (&mut [MaybeUninit<T>], impl Fn(usize) -> usize),
) {
    for r0 in (0..rows).step_by(TILE) {
        let tile_rows = TILE.min(rows - r0);
        for c0 in (0..cols).step_by(TILE) {
            let tile_cols = TILE.min(cols - c0);
            if tile_rows < TILE || tile_cols < TILE {
                for r in r0..r0 + tile_rows {
                    let src = &src[src_row(r) + c0..][..tile_cols];
                    for (c, &value) in (c0..).zip(src) {
                        dst[dst_row(c) + r].write(value);
                    }
                }
                continue;
            }
            let mut tile = [[T::zero(); TILE]; TILE];
            for (r, row) in (r0..).zip(&mut tile) {
                row.copy_from_slice(&src[src_row(r) + c0..][..TILE]);
            }
            for c in 0..TILE {
                let dst = &mut dst[dst_row(c0 + c) + r0..][..TILE];
                for (dst, row) in dst.iter_mut().zip(&tile) {
                    dst.write(row[c]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: WithDType + std::fmt::Debug>() {
        for (rows, cols) in [(1, 1), (8, 8), (3, 17), (16, 9), (21, 13)] {
            // Rows padded to a stride, and gaps between the written rows.
            let src: Vec<T> = (0..rows * (cols + 2))
                .map(|i| T::from_f64(i as f64))
                .collect();
            let (dst_stride, gap) = (rows + 3, T::from_f64(-1.0));
            let mut dst = vec![MaybeUninit::new(gap); cols * dst_stride];
            transpose(
                (rows, cols),
                (&src, |r| r * (cols + 2)),
                (&mut dst, |c| c * dst_stride),
            );
            for c in 0..cols {
                for r in 0..dst_stride {
                    let written = unsafe { dst[c * dst_stride + r].assume_init() };
                    match r < rows {
                        true => assert_eq!(written, src[r * (cols + 2) + c], "{rows}x{cols}"),
                        false => assert_eq!(written, gap, "{rows}x{cols}: wrote a gap"),
                    }
                }
            }
        }
    }

    #[test]
    fn transpose_moves_every_value_of_whole_and_partial_tiles() {
        check::<f32>();
        check::<f64>();
    }
}
