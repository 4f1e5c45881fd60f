"""The repair: directions, stage 1 (projection), stage 2 (restoration chosen by gradient, with
rollback and a task guard), the per-adapter search, the folder pipeline and its report.
Never imports beds/, hub/ or cli/."""
