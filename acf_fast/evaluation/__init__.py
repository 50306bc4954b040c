"""Full-catalogue evaluation: metrics, the evaluation run, report and plots."""
