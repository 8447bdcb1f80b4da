"""The page's CSS (given to `launch`, as Gradio 6 wants)."""

CSS = """
.lorsu-metrics {display: flex; gap: 12px; flex-wrap: wrap;}
.lorsu-metric {flex: 1 1 220px; border-radius: 12px; padding: 10px 14px; border: 2px solid;}
.lorsu-metric-name {font-weight: 700; font-size: 15px; letter-spacing: .04em;}
.lorsu-metric-value {font-size: 46px; font-weight: 800; line-height: 1.05;}
.lorsu-metric-change {font-size: 14px; font-weight: 600; min-height: 1.2em;}
.lorsu-metric-help {font-size: 12.5px; opacity: .9; margin-top: 4px;}
.lorsu-metric.lorsu-good, .lorsu-metric.lorsu-good * {background: #ecfdf5; color: #065f46 !important;}
.lorsu-metric.lorsu-good {border-color: #10b981;}
.lorsu-metric.lorsu-bad, .lorsu-metric.lorsu-bad * {background: #fef2f2; color: #991b1b !important;}
.lorsu-metric.lorsu-bad {border-color: #ef4444;}
.lorsu-metric.lorsu-flat, .lorsu-metric.lorsu-flat * {background: #f9fafb; color: #374151 !important;}
.lorsu-metric.lorsu-flat {border-color: #9ca3af;}
.lorsu-metric.lorsu-none, .lorsu-metric.lorsu-none * {background: #f9fafb; color: #6b7280 !important;}
.lorsu-metric.lorsu-none {border-color: #e5e7eb;}
.lorsu-metric-note {font-size: 12.5px; color: #6b7280; margin-top: 6px;}
.lorsu-status {padding: 9px 14px; border-radius: 8px; font-weight: 600; font-size: 15px;}
.lorsu-status * {color: inherit !important;}
.lorsu-status-info {background: #eff6ff; color: #1e3a8a;}
.lorsu-status-busy {background: #fffbeb; color: #92400e;}
.lorsu-status-done {background: #ecfdf5; color: #065f46;}
.lorsu-status-stopped {background: #f3f4f6; color: #374151;}
.lorsu-status-error {background: #fef2f2; color: #991b1b;}
.lorsu-notice {background: #fff7ed; border: 1px solid #fdba74; border-radius: 8px;
  padding: 4px 12px;}
.lorsu-probes {background: white; border-radius: 8px; padding: 8px;}
.lorsu-probes table {width: 100%; border-collapse: collapse; font-size: 13.5px;}
.lorsu-probes td b, .lorsu-probes td i {color: #1f2937 !important;}
.lorsu-probes th, .lorsu-probes td {border-bottom: 1px solid #e5e7eb; padding: 4px 6px;
  text-align: left; vertical-align: middle; color: #1f2937 !important; background: white;}
.lorsu-probes img {width: 64px; height: 64px; image-rendering: pixelated; border-radius: 4px;}
.lorsu-probe-q, .lorsu-probe-q * {font-size: 13px; color: #4b5563 !important; margin-bottom: 4px;}
.lorsu-probes .lorsu-ok .lorsu-mark {color: #059669 !important; font-weight: 700;}
.lorsu-probes .lorsu-no .lorsu-mark {color: #dc2626 !important; font-weight: 700;}
.lorsu-wait {color: #9ca3af;}
.lorsu-small {font-size: 13px; color: #6b7280;}
/* The status line stays at the top of the window (Train, Stop and the TI/CC cards head the
   live view, just below it). */
#lorsu-status {position: sticky; top: 0; z-index: 40;}
/* Gradio's container has overflow: hidden, which makes it the sticky elements' scroll box;
   clip cuts the same overflow without being one. */
.gradio-container {overflow: clip !important;}
/* Phones: wide tables scroll sideways instead of being cut off. */
#lorsu-table, #lorsu-compare-table, .lorsu-probes {overflow-x: auto; max-width: 100%;}
@media (max-width: 600px) {  /* phones: the two cards side by side */
  .lorsu-metric {flex: 1 1 40%; padding: 6px 8px;}
  .lorsu-metric-value {font-size: 32px;}
  .lorsu-metric-help {font-size: 11.5px;}
}
/* Dark mode: the charts are PNGs drawn on white; inverted and turned back round the colour
   wheel they become dark panels with light text, and blue, orange, red and green keep their
   hue (their lightness flips, as the rest of the page's does). */
.dark #lorsu-curves img, .dark #lorsu-heatmap img, .dark #lorsu-matrix img,
.dark #lorsu-compare-figure img {filter: invert(0.92) hue-rotate(180deg);}
"""
