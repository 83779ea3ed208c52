"""The stats jobs: repro jobs at reduced size, and ppi_eval on the shipped example."""
import json
import os

from absl.testing import absltest
import numpy as np

from configs import ppi_eval as ppi_eval_config
from configs.repro import cost_optimal as cost_optimal_config
from configs.repro import stratppi as stratppi_config
from stats import jobs, repro

EXAMPLE = os.path.join(os.path.dirname(__file__), 'data', 'ppi_example.csv')


class ReproJobsTest(absltest.TestCase):

  def test_stratppi_hits_n1000_targets(self):
    config = stratppi_config.get_config()
    config.n_values = (1000,)
    config.n_trials = 40
    workdir = self.create_tempdir().full_path
    repro.stratppi(config, workdir)
    for name in ['stratppi.md', 'stratppi.json', 'stratppi_widths.png']:
      self.assertTrue(os.path.getsize(os.path.join(workdir, name)) > 0, name)
    rows = json.load(open(os.path.join(workdir, 'stratppi.json')))['rows']
    widths = {(r['scenario'], r['allocation']): r['width_stratppi'] for r in rows}
    # PAPERS.md §9 firm targets at n = 1000, within ±0.005.
    self.assertAlmostEqual(widths['homogeneous', 'proportional'], 0.077, delta=0.005)
    self.assertAlmostEqual(widths['different_variance', 'proportional'], 0.077, delta=0.005)
    self.assertAlmostEqual(widths['different_variance', 'optimal'], 0.068, delta=0.005)
    self.assertAlmostEqual(rows[0]['width_classical'], 0.104, delta=0.005)

  def test_cost_optimal_outputs(self):
    config = cost_optimal_config.get_config()
    config.difficulty_a = (0.3,)
    config.population = 5_000
    config.n_mc = 20
    config.check_width = 0.08
    config.target_widths = (0.04, 0.08)
    workdir = self.create_tempdir().full_path
    rows = repro.cost_optimal(config, workdir)
    for name in ['cost_optimal.md', 'cost_optimal.json', 'cost_optimal_savings.png']:
      self.assertTrue(os.path.getsize(os.path.join(workdir, name)) > 0, name)
    cost = {r['method']: r['cost_at_width'] for r in rows}
    # With heterogeneous difficulty the active policy is the cheapest, and the cost-optimal
    # random rate is never worse than the fixed uniform rate.
    self.assertEqual(min(cost, key=cost.get), 'active (model U)')
    self.assertLessEqual(cost['random π*'], cost['uniform PPI'])


class PPIEvalTest(absltest.TestCase):

  def _config(self, **overrides):
    config = ppi_eval_config.get_config()
    config.input = EXAMPLE
    config.update(overrides)
    return config

  def test_example_csv_and_jsonl(self):
    workdir = self.create_tempdir().full_path
    result = jobs.ppi_eval(self._config(), workdir)
    saved = json.load(open(os.path.join(workdir, 'ppi_eval.json')))
    self.assertEqual(saved['n_labelled'], 75)
    self.assertEqual(saved['n_unlabelled'], 225)
    lo, hi = saved['ci']
    self.assertLess(lo, saved['estimate'])
    self.assertLess(saved['estimate'], hi)
    self.assertLess(hi - lo, saved['classical_ci'][1] - saved['classical_ci'][0])
    self.assertGreater(saved['effective_sample_size'], 75)
    strat = jobs.ppi_eval(self._config(stratum_column='stratum'), workdir)
    self.assertEqual(strat['method'], 'StratPPI')
    self.assertLen(strat['lambda'], 2)
    # The same data as JSONL, with unlabelled rows missing the label key, gives the same answer.
    import csv
    path = os.path.join(workdir, 'example.jsonl')
    with open(EXAMPLE) as f, open(path, 'w') as out:
      for row in csv.DictReader(f):
        row = {k: v for k, v in row.items() if v != ''}
        out.write(json.dumps(row) + '\n')
    again = jobs.ppi_eval(self._config(input=path), workdir)
    np.testing.assert_allclose(again['ci'], result['ci'])

  def test_errors(self):
    workdir = self.create_tempdir().full_path
    with self.assertRaisesRegex(FileNotFoundError, 'no such file'):
      jobs.ppi_eval(self._config(input='/nonexistent.csv'), workdir)
    with self.assertRaisesRegex(ValueError, "score_column='confidence'"):
      jobs.ppi_eval(self._config(score_column='confidence'), workdir)
    with self.assertRaisesRegex(ValueError, "stratum_column='group'"):
      jobs.ppi_eval(self._config(stratum_column='group'), workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'ppi_eval.json')))


if __name__ == '__main__':
  absltest.main()
