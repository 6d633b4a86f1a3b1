//! The SVG plots of a run report (training curves, the spread of test
//! accuracy over episodes) and of several runs' validation curves. Each
//! function returns the SVG text, or the drawing error as a message for the
//! caller to name the file with.

use std::ops::Range;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::curves::Validation;
use crate::protocol::Evaluation;
use crate::report::TrainingRecord;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
/// What drawing on an SVG canvas can fail with (the backend's I/O errors).
type Drawn = Result<(), DrawingAreaErrorKind<std::io::Error>>;

const RAW: RGBAColor = RGBAColor(31, 119, 180, 0.3);
const SMOOTHED: RGBColor = RGBColor(31, 119, 180);
const VALIDATION: RGBColor = RGBColor(214, 39, 40);
/// A polyline with more points than this is thinned: a long run logs tens
/// of thousands of steps, far more than a plot's width in pixels.
const MAX_POINTS: usize = 2_000;
/// Episode histograms get at most this many bars.
const MAX_BARS: usize = 60;

/// Training loss (top) and training and validation accuracy (bottom) over
/// steps, each raw and smoothed by a moving average.
pub(crate) fn training_svg(records: &[TrainingRecord]) -> Result<String, String> {
    render((900, 700), |root| {
        let (top, bottom) = root.split_vertically(350);
        let steps = axis_range(records.iter().map(|r| r.step as f64), 0.0);
        let loss: Vec<(f64, f64)> = records.iter().map(|r| (r.step as f64, r.loss)).collect();
        // Loss falls and accuracy rises: each legend goes where its curves are not.
        draw_curves(
            &top,
            "Training loss",
            "loss",
            SeriesLabelPosition::UpperRight,
            steps.clone(),
            &loss,
            &[],
        )?;
        let percent = |v: f64| v * 100.0;
        let accuracy: Vec<(f64, f64)> = records
            .iter()
            .map(|r| (r.step as f64, percent(r.accuracy)))
            .collect();
        let validation: Vec<(f64, f64)> = records
            .iter()
            .filter_map(|r| r.val_accuracy.map(|v| (r.step as f64, percent(v))))
            .collect();
        draw_curves(
            &bottom,
            "Accuracy",
            "accuracy (%)",
            SeriesLabelPosition::LowerRight,
            steps,
            &accuracy,
            &validation,
        )
    })
}

/// One panel: `raw` as a faint line with its moving average over it, and
/// `validation` (if any) as points joined by a line.
fn draw_curves(
    area: &Area,
    caption: &str,
    y_label: &str,
    legend: SeriesLabelPosition,
    steps: Range<f64>,
    raw: &[(f64, f64)],
    validation: &[(f64, f64)],
) -> Drawn {
    // A diverged run logs NaN or infinite losses; they cannot be drawn.
    let finite = |points: &[(f64, f64)]| -> Vec<(f64, f64)> {
        points
            .iter()
            .copied()
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let (raw, validation) = (finite(raw), finite(validation));
    let values = raw.iter().chain(&validation).map(|&(_, y)| y);
    let mut chart = chart_builder(area, caption)
        // Room for the last step's label, centred on the right edge.
        .margin_right(30)
        .build_cartesian_2d(steps, axis_range(values, 0.05))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_label)
        .x_label_formatter(&|step| format!("{step:.0}"))
        .draw()?;

    // About 25 windows over the run: smooth enough to show the trend of
    // noisy per-batch values, short enough to follow it.
    let window = raw.len().div_ceil(25);
    let ys: Vec<f64> = raw.iter().map(|&(_, y)| y).collect();
    let smoothed: Vec<(f64, f64)> = raw
        .iter()
        .zip(moving_average(&ys, window))
        .map(|(&(x, _), y)| (x, y))
        .collect();
    chart
        .draw_series(LineSeries::new(thin(&raw), RAW))?
        .label("training")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RAW));
    chart
        .draw_series(LineSeries::new(thin(&smoothed), SMOOTHED.stroke_width(2)))?
        .label(format!("training, moving average of {window}"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], SMOOTHED.stroke_width(2)));
    if !validation.is_empty() {
        chart.draw_series(LineSeries::new(thin(&validation), VALIDATION))?;
        chart
            .draw_series(
                validation
                    .iter()
                    .map(|&p| Circle::new(p, 3, VALIDATION.filled())),
            )?
            .label("validation")
            .legend(|(x, y)| Circle::new((x + 10, y), 3, VALIDATION.filled()));
    }
    draw_legend(&mut chart, legend)
}

/// Histogram of per-episode test accuracy, with the mean marked.
/// `evaluation` must have at least one episode.
pub(crate) fn episodes_svg(evaluation: &Evaluation) -> Result<String, String> {
    // An episode's accuracy is k / queries for a whole number k of correct
    // queries: binning by k gives one bar per attainable value, where bins of
    // arbitrary width would alias into a comb.
    let spec = evaluation.protocol.spec;
    let queries = (spec.ways * spec.queries).max(1) as f64;
    let correct: Vec<usize> = evaluation
        .episodes
        .iter()
        .map(|e| (e.accuracy * queries).round() as usize)
        .collect();
    let lowest = correct.iter().copied().min().unwrap_or(0);
    let highest = correct.iter().copied().max().unwrap_or(0);
    let per_bar = (highest - lowest + 1).div_ceil(MAX_BARS);
    let mut bars = vec![0usize; (highest - lowest) / per_bar + 1];
    for k in &correct {
        bars[(k - lowest) / per_bar] += 1;
    }
    // Bar b covers k in [lowest + b * per_bar, lowest + (b + 1) * per_bar),
    // drawn in percent with each k in the middle of its unit.
    let percent = |k: f64| (k - 0.5) / queries * 100.0;
    let left = percent(lowest as f64);
    let right = percent((lowest + bars.len() * per_bar) as f64);
    let tallest = bars.iter().copied().max().unwrap_or(0) as f64;
    let mean = evaluation.accuracy.mean * 100.0;

    render((800, 450), |root| {
        let caption = format!("Test accuracy over {} episodes", evaluation.episodes.len());
        let mut chart =
            chart_builder(root, caption).build_cartesian_2d(left..right, 0.0..tallest * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("accuracy (%)")
            .y_desc("episodes")
            .y_label_formatter(&|count| format!("{count:.0}"))
            .draw()?;
        // A gap of a tenth of a unit keeps neighbouring bars apart.
        let gap = 0.1 / queries * 100.0;
        chart.draw_series(bars.iter().enumerate().map(|(b, &count)| {
            let first = (lowest + b * per_bar) as f64;
            Rectangle::new(
                [
                    (percent(first) + gap, 0.0),
                    (percent(first + per_bar as f64) - gap, count as f64),
                ],
                SMOOTHED.mix(0.7).filled(),
            )
        }))?;
        chart
            .draw_series(LineSeries::new(
                [(mean, 0.0), (mean, tallest * 1.1)],
                VALIDATION.stroke_width(2),
            ))?
            .label(format!("mean {mean:.2}%"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], VALIDATION.stroke_width(2)));
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)
    })
}

/// Colours of successive runs in a plot of several.
const RUN_COLOURS: [RGBColor; 6] = [
    SMOOTHED,
    VALIDATION,
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
];

/// Validation accuracy (%) of several runs against hours of training, each
/// run a line with points, and `target` (a fraction) as a dashed line.
pub(crate) fn validation_svg(
    runs: &[(&str, Vec<Validation>)],
    target: Option<f64>,
) -> Result<String, String> {
    let percent = |v: f64| v * 100.0;
    let all = || runs.iter().flat_map(|(_, points)| points);
    let hours = axis_range(all().map(|v| v.hours).chain([0.0]), 0.02);
    let accuracy = axis_range(
        all()
            .map(|v| percent(v.accuracy))
            .chain(target.map(percent)),
        0.05,
    );
    render((900, 500), |root| {
        let mut chart = chart_builder(root, "Validation accuracy against training time")
            .margin_right(30)
            .build_cartesian_2d(hours.clone(), accuracy)?;
        chart
            .configure_mesh()
            .x_desc("hours of training (wall clock)")
            .y_desc("validation accuracy (%)")
            .draw()?;
        if let Some(target) = target {
            let y = percent(target);
            let dashes =
                DashedLineSeries::new([(hours.start, y), (hours.end, y)], 8, 6, BLACK.into());
            chart
                .draw_series(dashes)?
                .label(format!("target {y:.1}%"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
        }
        for ((name, points), colour) in runs.iter().zip(RUN_COLOURS.iter().cycle()) {
            let points: Vec<(f64, f64)> = points
                .iter()
                .map(|v| (v.hours, percent(v.accuracy)))
                .collect();
            chart.draw_series(LineSeries::new(thin(&points), colour))?;
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 2, colour.filled())))?
                .label(*name)
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, colour.filled()));
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)
    })
}

/// A chart with `caption` over it and the margins and axis-label room every
/// plot here has.
fn chart_builder<'a, 'b>(
    area: &'a Area<'b>,
    caption: impl AsRef<str>,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60);
    builder
}

/// The legend of a chart's labelled series, on a translucent white box.
fn draw_legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> Drawn {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
}

/// Draws on a white SVG canvas of `size` pixels and returns the SVG text.
fn render(size: (u32, u32), draw: impl FnOnce(&Area) -> Drawn) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(&root).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// The range of the finite `values`, widened by `margin` of its width on
/// each side; a single value gets a unit-wide range around it, and no
/// finite value at all gives 0..1, so the chart can always be built.
fn axis_range(values: impl Iterator<Item = f64>, margin: f64) -> Range<f64> {
    let (low, high) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), v| {
            (low.min(v), high.max(v))
        });
    if low > high {
        0.0..1.0
    } else if low == high {
        low - 0.5..high + 0.5
    } else {
        let pad = (high - low) * margin;
        low - pad..high + pad
    }
}

/// Mean of each value and the `window - 1` before it (fewer at the start).
fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

/// Every k-th point so that at most about `MAX_POINTS` remain, keeping the last.
fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let every = points.len().div_ceil(MAX_POINTS).max(1);
    let mut kept: Vec<(f64, f64)> = points.iter().copied().step_by(every).collect();
    if let Some(&last) = points.last() {
        if kept.last() != Some(&last) {
            kept.push(last);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_averages_the_trailing_window() {
        let smoothed = moving_average(&[1.0, 2.0, 3.0, 4.0, 5.0], 2);
        assert_eq!(smoothed, vec![1.0, 1.5, 2.5, 3.5, 4.5]);
        assert_eq!(moving_average(&[3.0, 5.0], 0), vec![3.0, 5.0]);
    }

    #[test]
    fn axis_ranges_are_always_drawable() {
        assert_eq!(axis_range([2.0, 4.0].into_iter(), 0.5), 1.0..5.0);
        assert_eq!(axis_range([3.0, f64::NAN].into_iter(), 0.1), 2.5..3.5);
        assert_eq!(axis_range(std::iter::empty(), 0.1), 0.0..1.0);
    }

    #[test]
    fn thinning_keeps_the_ends() {
        let points: Vec<(f64, f64)> = (0..5_001).map(|i| (i as f64, 0.0)).collect();
        let thinned = thin(&points);
        assert!(thinned.len() <= MAX_POINTS + 1, "{}", thinned.len());
        assert_eq!(thinned.first(), points.first());
        assert_eq!(thinned.last(), points.last());
    }
}
