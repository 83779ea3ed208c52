"""Tool use and selective prediction by collaborative self-play: the environment of a
miniature of arXiv:2503.14481 (PAPERS.md §6).

World (deterministic from ``config.seed``): two disjoint synthetic fact corpora, ``people``
(invented person names with a ``job`` and a ``pet``) and ``places`` (invented place names
with a ``river`` and a ``dish``). A fact is ``subject relation value``, e.g. ``kavo job
head baker``: with ``value_words=2`` a value is a qualifier and a base word, 8 x 8 = 64 per
relation, so that an answer guessed without knowledge is rarely right (1/64) and often half
right (word-level F1 0.5); ``value_words=1`` keeps the 8 base words (a guess is right 1 time in
8, and then outscores a search, which is what ReST learnt to exploit, docs/RESULTS.md).
A fixed fraction ``memorised_fraction`` of the facts is the policy's pretraining text
(``pretraining_texts``): those questions are answerable from memory, the rest need
retrieval; no other fact is in any training text but a tool result. Questions ask one
relation: ``what is the job of kavo ?``. The ``train`` and ``test`` splits (and, with
``demo_fraction`` > 0, the ``demo`` split of the demonstrations) ask the relations
``train_relations`` (job, river); ``ood`` asks the others (pet, dish), whose facts the policy
memorised in the same proportion but was never asked. With ``demo_ood_fraction`` > 0, that
share of the ood questions is the ``demo_ood`` split instead, for format demonstrations only:
the base policy then knows how to search for every fact type, as an LLM's tool use does, and
what ``ood`` tests is whether the decision trained on ``train_relations`` (oracle
demonstrations, ReST) carries over to a fact type it was never trained on; without it no
call in any training text names an ood relation, and no policy's ood search succeeds
(docs/RESULTS.md). With ``more_relations=k`` each corpus also has the first k of
``MORE_RELATIONS`` (people: hobby, car; places: tree, bird; their facts drawn on a random
stream of their own, so that the base relations' facts and, with ``memorise_by='subject'``,
what is memorised are unchanged), which ``train_relations`` may name: with several relations
per corpus asked in training, the relation in a call could be learnt as a word to copy from
the question rather than a constant of the corpus. It was not, by this small model: the SFT
policy's ood calls still named no ood relation (docs/RESULTS.md). With
``memorise_by='fact'`` each fact is memorised on its own (a subject's job can be known and
its pet not); with ``'subject'``, all of a subject's facts or none, so that knowing a fact
is knowing its entity, the signal LLMs are found to gate answering on (Ferrando et al.
2025, "Do I know this entity?"). Invented names have ``name_syllables`` syllables.

Unknown entities (``unknown_subjects``): with ``'fixed'`` every question is about a world
subject, so the train split's few hundred questions can be learnt one by one, the decision
with them. With ``'fresh'``, each unmemorised question of the ``train`` and ``demo`` splits
(drawn at random, not named by ``question=``) is asked about a newly drawn name from
``spare_names`` with a uniformly drawn value, which the tool returns: as for an LLM over
thousands of questions, an unknown entity is one never seen before, and the decision cannot
be fitted per question. ``test`` and ``ood`` ask the world's subjects, the unmemorised ones
seen in no training text.

Known entities cannot be drawn fresh: a memorised fact must be in the pretraining text. So
ReST, asking the train split's questions every iteration, can fit its decision to answer per
memorised name. ``train_chunks=k`` deals the train questions into ``k`` disjoint splits
``train_0`` ... ``train_{k-1}`` (for ``rest.grow_splits``): each Grow then asks memorised
names no earlier iteration asked, as the test split does.

Name tokens (``name_tokens``): every name in use (the corpora's, the quizzes' and the spare
names of fresh questions; ``spare_names=k`` keeps the first k spare names, to bound the
vocabulary) is one token of its own (``whole_words``, which ``rl_sft`` adds to the
SentencePiece vocabulary), and the pretraining text spells every one of them both ways and
states no fact with it (``spellings``). Split into syllable pieces, a name is familiar only as
a conjunction of pieces, and a small model fitted its decision per name (docs/RESULTS.md). As a
word of its own that the pretraining text shows, as a name is in an LLM's vocabulary, knowing a
name is knowing facts about it. Without the spellings a name no text shows keeps an untrained
token, which the policy cannot copy into a search query. With it the decision generalises to
unseen names, but this small model copies a one-token name into a call unreliably, worse
after ReST (docs/RESULTS.md); the job pairs it with ``spelt_names``.

Spelt names (``spelt_names``): the question writes the subject as its word and spelt in its
syllables, ``what is the job of kalipe ka li pe ?``, and calls, delegations and tool results
spell it, ``search people ka li pe job``; ``parse`` joins the words between corpus and
relation (a call naming the whole word parses too). With ``name_tokens`` the one-token word
carries what is known about the entity, and a call copies syllable pieces, as in a question
of syllable names. Every call's name is then written with the same 16 syllable tokens, so
training on calls that name some names does not make the others less likely outputs, which
copying one-token names suffered from under ReST. Spelling a one-token name into a call,
with the question showing only the word, was not learnt by SFT here: no call of the SFT
policy, sampled, named its subject (docs/RESULTS.md).

Tool: exact-match retrieval over one corpus. ``search people kavo job`` returns the tool
turn ``result kavo job head baker`` (or ``result none`` for an unknown key or the wrong corpus).

Modes (``config.mode``):
  ``single``   roles user, assistant, tool. The assistant may ``search people|places
               SUBJECT RELATION`` (a tool turn follows) and ends with ``answer WORDS``,
               ``hedge WORDS`` (an answer marked uncertain) or ``hedge`` (I don't know).
  ``society``  roles user, asker, people, places, tool: the asker has no tool; it may
               ``delegate people|places SUBJECT RELATION`` to the helper of that corpus, who
               may ``search SUBJECT RELATION`` over its own corpus and replies ``answer ...``
               / ``hedge ...``; the reply goes back to the asker, who ends the episode with
               ``answer``, ``hedge WORDS`` or ``hedge``. Every role is the same policy with its
               own system turn (``view``). With ``helper_view='all'`` every role sees the
               whole conversation, so a helper can search the question's subject whatever
               name the asker delegated, and a wrong name goes unpunished; with
               ``'delegation'`` a helper sees only the asker's calls to it and its own
               exchange, as the paper's helpers get only the asker's question. With
               ``asker_must_delegate`` the asker's first turn must be a delegation (an
               answer or hedge before any helper's reply is invalid): the delegated helper
               then decides between searching and answering from memory, the single
               agent's own decision under the same tool word, where otherwise the asker
               makes it with ``delegate`` and a helper is asked only what the asker does
               not know. With ``helper_call_corpus`` a helper's call names its own corpus,
               ``search people SUBJECT RELATION`` (naming another is a malformed call): the
               single agent's call, word for word. Neither option made the single agent
               inherit the society's decision here (docs/RESULTS.md). With
               ``asker_call_word='search'`` the asker's delegation is written ``search
               people|places SUBJECT RELATION``, the single agent's call word for word (it
               still goes to that corpus's helper and is not a search): the asker's decision
               is then the single agent's, in its words. With it (and ``demo_ood_fraction``)
               the single agent inherits the society's decision in most seeds; the job uses
               both (docs/RESULTS.md, measurement 5).

Group reward (the whole society shares it), with F1 the word-level F1 of the final answer
against the fact's value (0 for a bare ``hedge``), ``c = search_cost`` per search and
``d = delegation_cost`` per delegation of the asker (its calls to a helper):

  answer   F1 - c * searches - d * delegations
  hedge    (1 - h) * F1 + h * (1 - F1) - c * searches - d * delegations,
           h = hedge_credit (0.3 by default)

so hedging earns h exactly when the answer would be wrong and costs h when it would be
right: with answer-correctness probability p, answering is better iff p > 1/2 (calibrated
selective prediction). With ``d = 0`` a delegation is free, so on a memorised question the
asker answering and the asker delegating to a helper that answers from memory (the same
policy, the same memory) earn the same, and ReST keeps either; with
``asker_call_word='search'`` the second is, in the single agent's words, a paid search
(docs/RESULTS.md, measurement 7). A malformed call (``search`` or ``delegate`` with
arguments that do not parse, e.g. an unknown corpus) is a failed call: it counts against
``max_calls``, costs c (a search) or d (a delegation) like a well-formed one, and the tool
turn that follows is an error observation with the call's usage; a search that matches
nothing returns ``result none``. Any other action that does not parse, a call beyond
``max_calls`` (searches and delegations), a role speaking out of turn or a turn cut at the
token limit is invalid and ends the episode: reward ``-c * searches - d * delegations``
(F1 0, no hedge credit). ``oracle_turn`` is the action
supervision of the baseline: search exactly when the fact is not memorised.

Demonstrations (``demonstration``, the SFT data of ``rl_sft``): behaviour ``oracle`` plays
``oracle_turn``; behaviour ``generic`` shows the action format only: every deciding turn
(the first turn of the assistant, the asker or a delegated helper) draws its action from
(tool call, answer, hedge) with probabilities ``generic_actions`` whether or not the fact is
memorised; answers and hedges from memory give the value when memorised and a uniform guess
of the relation's values otherwise (with ``asker_must_delegate`` the asker's first turn always
delegates); after a tool result the turn answers with the value, and the asker relays the
helper's reply.

Fixed knowledge (``fixed_knowledge``, ``relabel``): ReST trains on its own rollouts, and a
rollout can teach a fact in two ways, by the answer after a tool result and by a lucky guess
that wins its group. With a few hundred questions revisited every iteration both happen
(docs/RESULTS.md), unlike the paper's thousands of questions and an LLM that does not learn a
fact from one rollout. So the rollouts are trained on with the retrieved value replaced by a
counterfactual one, and a lucky guess is never kept: ReST learns when to search, and what
the policy knows stays what it memorised.

Pretraining (``pretraining_texts``): each memorised fact as the statement ``kavo job head
baker`` and, with ``qa_pretraining``, also as the question-answer text ``what is the job of
kavo ? head baker`` (plain text, not a conversation). A small model trained from scratch on
statements alone does not recall them when asked a question about them (knowledge stored in
one form is not extractable in another unless the training data shows both forms for the same
facts, Allen-Zhu & Li 2023, "Physics of language models 3.1"); the question form stands in
for the varied forms a pretrained LLM has seen its knowledge in. With ``quiz_pretraining``,
each memorised fact is also a closed-book quiz conversation (``pretraining_episodes``): the
user's question, then the first role (assistant or asker) answers ``answer VALUE`` under its
own system prompt ``QUIZ_PROMPT``. Plain text alone does not carry over to the chat: a policy
trained on statements and question-answer text recalled 100% of its memorised facts as plain
text but 19-41% when asked in a conversation (docs/RESULTS.md); the quiz stands in for the
instruction tuning that makes a pretrained LLM's knowledge answerable in a chat. It shows no
tool, no hedge and no unmemorised fact, so it teaches what is known, not when to search.
Unmemorised facts appear in none of these. With ``quiz_unknown`` > 0, that many quiz
conversations ask about unknown entities (``quiz_names``: names of no corpus, apart from
the fresh questions' ``spare_names``), answered with a bare ``hedge``: the "I don't know"
that instruction tuning teaches an LLM alongside its knowledge, closed book and with no
tool, so it says what is unknown, not when to search. With ``quiz_prompt='role'`` every quiz
is under the first role's own system prompt instead (tools offered, none used), so the
quizzes also show that role answering what it knows from memory and hedging on the rest.
"""
import dataclasses
import itertools
import re
from typing import Optional

from ml_collections import config_dict
import numpy as np

from rl.envs import base

CORPORA = {'people': ('job', 'pet'), 'places': ('river', 'dish')}
# relations a world adds to each corpus with ``more_relations`` (module docstring)
MORE_RELATIONS = {'people': ('hobby', 'car'), 'places': ('tree', 'bird')}
BASES = {
    'job': ('baker', 'pilot', 'nurse', 'judge', 'farmer', 'singer', 'doctor', 'writer'),
    'pet': ('cat', 'dog', 'owl', 'fox', 'hare', 'goat', 'frog', 'crow'),
    'river': ('amber', 'silver', 'stone', 'willow', 'cedar', 'ember', 'misty', 'copper'),
    'dish': ('soup', 'stew', 'bread', 'rice', 'pie', 'curry', 'salad', 'noodles'),
    'hobby': ('chess', 'golf', 'tennis', 'poker', 'yoga', 'darts', 'rowing', 'fishing'),
    'car': ('van', 'truck', 'coupe', 'jeep', 'taxi', 'sedan', 'wagon', 'buggy'),
    'tree': ('oak', 'pine', 'elm', 'birch', 'maple', 'ash', 'yew', 'palm'),
    'bird': ('hawk', 'swan', 'wren', 'robin', 'heron', 'finch', 'gull', 'lark'),
}
QUALIFIERS = {
    'job': ('head', 'night', 'young', 'chief', 'senior', 'field', 'court', 'city'),
    'pet': ('grey', 'black', 'white', 'red', 'brown', 'spotted', 'tiny', 'old'),
    'river': ('upper', 'lower', 'north', 'south', 'east', 'west', 'great', 'little'),
    'dish': ('spicy', 'sweet', 'cold', 'hot', 'green', 'salty', 'smoked', 'baked'),
    'hobby': ('weekly', 'daily', 'indoor', 'outdoor', 'casual', 'serious', 'team', 'solo'),
    'car': ('rusty', 'shiny', 'fast', 'slow', 'long', 'wide', 'cheap', 'loud'),
    'tree': ('tall', 'short', 'ancient', 'twisted', 'lone', 'bare', 'leafy', 'broad'),
    'bird': ('golden', 'pale', 'dark', 'noisy', 'quiet', 'swift', 'royal', 'wild'),
}
_SYLLABLES = ('ka', 'vo', 'li', 'ru', 'me', 'no', 'ta', 'si', 'be', 'do', 'fa', 'gu', 'ho',
              'ji', 'pe', 'zu')
SEARCH, DELEGATE, ANSWER, HEDGE = 'search', 'delegate', 'answer', 'hedge'
QUIZ_PROMPT = 'you are a quiz player . answer from memory .'
BEHAVIOURS = ('generic', 'oracle')


def default_config() -> config_dict.ConfigDict:
  """Env config (``make_env`` dispatches on ``name``)."""
  return config_dict.ConfigDict(dict(
      name='collab',
      seed=0,
      mode='society',  # or 'single'
      subjects_per_corpus=40,
      memorised_fraction=0.5,
      # 'fact': each fact memorised independently; 'subject': all of a subject's facts or none
      # (knowing an entity, docstring)
      memorise_by='fact',
      # 'fixed': every question is about a world subject; 'fresh': an unmemorised question
      # of the train and demo splits is asked about a newly drawn subject each time (unknown
      # entities are an open set, docstring); needs spare names (``name_syllables``)
      unknown_subjects='fixed',
      name_syllables=2,  # syllables per invented name: 2 gives 240 names, 3 gives 3,600
      search_cost=0.1,
      # cost of each asker delegation in the society's group reward (docstring); 0: free
      delegation_cost=0.0,
      hedge_credit=0.3,
      max_calls=2,
      train_relations=('job', 'river'),
      # k in [0, 2]: each corpus also has the first k of its MORE_RELATIONS (docstring)
      more_relations=0,
      test_fraction=0.25,  # of the (subject, train relation) questions, held out as 'test'
      # of those questions, the 'demo' split: the SFT demonstrations' questions, kept apart
      # from 'train' (ReST's) so that no demonstration's tool result shows a train fact
      demo_fraction=0.0,
      # of the ood questions, the 'demo_ood' split: format demonstrations may ask it (an
      # LLM's tool use covers every fact type), while the decision is trained on
      # train_relations only (docstring)
      demo_ood_fraction=0.0,
      qa_pretraining=True,  # the memorised facts also as question-answer text (docstring)
      quiz_pretraining=True,  # ... and as closed-book quiz conversations (docstring)
      # how many quiz conversations ask about an unknown entity (a spare name), answered with
      # a bare ``hedge``: "I don't know" taught with the knowledge (docstring)
      quiz_unknown=0,
      # the quizzes' system prompt: 'quiz' (QUIZ_PROMPT, a conversation apart from the
      # roles') or 'role' (the first role's own prompt, tools offered but not used)
      quiz_prompt='quiz',
      value_words=2,  # 2: 'head baker', 64 values per relation; 1: 'baker', 8 (docstring)
      # probabilities of (tool call, answer, hedge) at a generic demonstration's deciding turn
      generic_actions=(1 / 3, 1 / 3, 1 / 3),
      # ReST never learns a fact from its rollouts (``relabel``): what is known stays fixed
      fixed_knowledge=True,
      # the values a counterfactual retrieved value (demo split, relabel) is drawn from:
      # 'relation' (the question's) or 'all' (every relation's: reading is learnt for any value)
      counterfactual_pool='relation',
      # k > 0: the train questions also dealt into k disjoint splits 'train_0'... (docstring)
      train_chunks=0,
      # what a helper sees: 'all' (the whole conversation, the user's question included) or
      # 'delegation' (only its own exchange with the asker, docstring)
      helper_view='all',
      # society: the asker's first turn must delegate, so a helper decides whether to
      # search (docstring)
      asker_must_delegate=False,
      # a helper's call names its own corpus, ``search people SUBJECT RELATION``: the single
      # agent's call, word for word (docstring)
      helper_call_corpus=False,
      # the word of the asker's delegation: 'delegate', or 'search', the single agent's call
      # word for word (docstring)
      asker_call_word='delegate',
      # every invented name one token of its own (``whole_words``, docstring)
      name_tokens=False,
      # the question also spells the subject; calls and tool results spell it (docstring)
      spelt_names=False,
      spare_names=0,  # k > 0: only the first k spare names (fresh subjects); 0: all
  ))


@dataclasses.dataclass
class CollabEpisode(base.Episode):
  """Hidden state: the question's corpus, subject, relation and value; call counts."""
  corpus: str = ''
  subject: str = ''
  relation: str = ''
  value: str = ''
  memorised: bool = False
  searches: int = 0
  delegations: int = 0
  calls: int = 0
  helper: Optional[str] = None  # the helper working on a delegation (society)
  first_action: Optional[str] = None
  quiz: bool = False  # a closed-book quiz conversation (pretraining_episodes)


def f1(prediction: str, target: str) -> float:
  """Word-level F1 of two texts (bags of words)."""
  pred, gold = prediction.split(), target.split()
  common = sum(min(pred.count(w), gold.count(w)) for w in set(gold))
  if not common:
    return 0.0
  precision, recall = common / len(pred), common / len(gold)
  return 2 * precision * recall / (precision + recall)


def tool_word(role: str, asker_word: str = DELEGATE) -> str:
  """The call a role makes: the asker delegates (its call written ``asker_word``), the
  assistant and the helpers search."""
  return asker_word if role == 'asker' else SEARCH


def spell(name: str) -> str:
  """A name in its syllables: ``kalipe`` -> ``ka li pe`` (every syllable has 2 letters)."""
  return ' '.join(name[i:i + 2] for i in range(0, len(name), 2))


def parse(text: str, role: str, mode: str, spelt: bool = False, helper_corpus: bool = False,
          asker_word: str = DELEGATE) -> Optional[tuple]:
  """(action, arguments) of a model turn, or None when it does not parse for that role.

  single assistant: search CORPUS SUBJECT RELATION | answer WORDS | hedge [WORDS];
  society asker: delegate CORPUS SUBJECT RELATION | answer WORDS | hedge [WORDS];
  society helper (role = its corpus): search SUBJECT RELATION | answer WORDS | hedge [WORDS],
  or with ``helper_corpus`` search ROLE SUBJECT RELATION, naming its own corpus.
  The asker's call is written ``asker_word`` and parses as ``delegate`` either way.
  With ``spelt`` the SUBJECT may span several words, joined: ``ka li pe`` names ``kalipe``.
  """
  words = text.split()
  if not words:
    return None
  action, rest = words[0], words[1:]
  if action == ANSWER:
    return (ANSWER, ' '.join(rest)) if rest else None
  if action == HEDGE:
    return (HEDGE, ' '.join(rest))
  if action != tool_word(role, asker_word):
    return None
  if role in CORPORA and not helper_corpus:  # a helper searches its own corpus
    rest = [role] + rest
  elif role in CORPORA and rest[:1] != [role]:  # ... and may name no other
    return None
  if spelt and len(rest) > 3:
    rest = [rest[0], ''.join(rest[1:-1]), rest[-1]]
  if len(rest) != 3 or rest[0] not in CORPORA:
    return None
  return (tool_word(role), tuple(rest))


class CollabEnv(base.Env):
  """Questions answered from memory, by retrieval or by delegation (module docstring)."""

  scripted_roles = ('tool',)  # retrieval: never a model's turn, in self-play too

  def __init__(self, config: Optional[config_dict.ConfigDict] = None):
    config = default_config() if config is None else config
    if config.mode not in ('single', 'society'):
      raise ValueError(f"mode must be 'single' or 'society', got {config.mode!r}.")
    syllables = config.get('name_syllables', 2)
    if syllables not in (2, 3):
      raise ValueError(f'name_syllables must be 2 or 3, got {syllables}.')
    names = [''.join(p) for p in itertools.product(_SYLLABLES, repeat=syllables)
             if all(a != b for a, b in zip(p, p[1:]))]
    if not 1 <= config.subjects_per_corpus <= len(names) // 2:
      raise ValueError(f'subjects_per_corpus must be in [1, {len(names) // 2}] with '
                       f'{syllables}-syllable names, got {config.subjects_per_corpus}.')
    unknown_subjects = config.get('unknown_subjects', 'fixed')
    if unknown_subjects not in ('fixed', 'fresh'):
      raise ValueError("unknown_subjects must be 'fixed' or 'fresh', got "
                       f'{unknown_subjects!r}.')
    self.fresh = unknown_subjects == 'fresh'  # unmemorised train/demo questions: new names
    if self.fresh and 2 * config.subjects_per_corpus == len(names):
      raise ValueError("unknown_subjects='fresh' needs names outside the corpora: use "
                       'name_syllables=3 or fewer subjects_per_corpus.')
    for field in ('memorised_fraction', 'hedge_credit', 'test_fraction', 'demo_fraction'):
      if not 0 <= config[field] <= 1:
        raise ValueError(f'{field} must be in [0, 1], got {config[field]}.')
    if not 0 <= config.get('demo_ood_fraction', 0.0) < 1:
      raise ValueError('demo_ood_fraction must be in [0, 1) (some questions for '
                       f"'ood'), got {config.demo_ood_fraction}.")
    if config.test_fraction + config.demo_fraction >= 1:
      raise ValueError(f'test_fraction + demo_fraction must be < 1 (some questions for '
                       f"'train'), got {config.test_fraction} + {config.demo_fraction}.")
    for field in ('search_cost', 'delegation_cost'):
      if config.get(field, 0.0) < 0:
        raise ValueError(f'{field} must be >= 0, got {config[field]}.')
    if config.max_calls < 1:
      raise ValueError(f'max_calls must be >= 1, got {config.max_calls}.')
    more, most = config.get('more_relations', 0), min(map(len, MORE_RELATIONS.values()))
    if not 0 <= more <= most:
      raise ValueError(f'more_relations must be in [0, {most}], got {more}.')
    self.relations = {c: CORPORA[c] + MORE_RELATIONS[c][:more] for c in CORPORA}
    relations = [r for rels in self.relations.values() for r in rels]
    unknown = sorted(set(config.train_relations) - set(relations))
    if unknown or not config.train_relations:
      raise ValueError(f'train_relations must be some of {relations}, got '
                       f'{tuple(config.train_relations)}.')
    probs = np.asarray(config.generic_actions, np.float64)
    if probs.shape != (3,) or (probs < 0).any() or abs(probs.sum() - 1) > 1e-6:
      raise ValueError('generic_actions must be 3 probabilities (tool call, answer, hedge) '
                       f'summing to 1, got {tuple(config.generic_actions)}.')
    if config.get('counterfactual_pool', 'relation') not in ('relation', 'all'):
      raise ValueError("counterfactual_pool must be 'relation' or 'all', got "
                       f'{config.counterfactual_pool!r}.')
    if config.get('memorise_by', 'fact') not in ('fact', 'subject'):
      raise ValueError("memorise_by must be 'fact' or 'subject', got "
                       f'{config.memorise_by!r}.')
    if config.get('helper_view', 'all') not in ('all', 'delegation'):
      raise ValueError(f"helper_view must be 'all' or 'delegation', got "
                       f'{config.helper_view!r}.')
    if config.get('quiz_prompt', 'quiz') not in ('quiz', 'role'):
      raise ValueError(f"quiz_prompt must be 'quiz' or 'role', got {config.quiz_prompt!r}.")
    if config.get('asker_call_word', DELEGATE) not in (DELEGATE, SEARCH):
      raise ValueError(f"asker_call_word must be '{DELEGATE}' or '{SEARCH}', got "
                       f'{config.asker_call_word!r}.')
    if config.value_words not in (1, 2):
      raise ValueError(f'value_words must be 1 or 2, got {config.value_words}.')
    self.config, self.mode = config, config.mode
    self.must_delegate = self.mode == 'society' and config.get('asker_must_delegate', False)
    self.helper_corpus = config.get('helper_call_corpus', False)
    self.asker_word = config.get('asker_call_word', DELEGATE)
    self.spelt = config.get('spelt_names', False)
    self.values = {r: BASES[r] if config.value_words == 1 else
                   tuple(f'{q} {b}' for q in QUALIFIERS[r] for b in BASES[r])
                   for r in relations}
    self.roles = (('system', 'user', 'assistant', 'tool') if self.mode == 'single' else
                  ('system', 'user', 'asker') + tuple(CORPORA) + ('tool',))
    rng = np.random.default_rng(config.seed)
    names = [names[i] for i in rng.permutation(len(names))]
    n = config.subjects_per_corpus
    self.subjects = {'people': names[:n], 'places': names[n:2 * n]}  # disjoint
    quiz_unknown = config.get('quiz_unknown', 0)
    if not 0 <= quiz_unknown <= len(names) - 2 * n - self.fresh:
      raise ValueError(f'quiz_unknown must be in [0, {len(names) - 2 * n - self.fresh}] (the '
                       f'names outside the corpora), got {quiz_unknown}.')
    self.quiz_names = names[2 * n:2 * n + quiz_unknown]  # unknown entities of the quiz
    spare, available = config.get('spare_names', 0), len(names) - 2 * n - quiz_unknown
    if not 0 <= spare <= available:
      raise ValueError(f'spare_names must be in [0, {available}] (0: all), got {spare}.')
    # the subjects of fresh unknown questions
    self.spare_names = names[2 * n + quiz_unknown:][:spare or None]
    self.names = names[:2 * n + quiz_unknown + len(self.spare_names)]  # every name in use
    self.facts = {}  # (corpus, subject, relation) -> value
    more_rng = np.random.default_rng([config.seed, 2])  # so that the base world is the same
    for corpus, rels in self.relations.items():
      for subject in self.subjects[corpus]:
        for relation in rels:
          draw = rng if relation in CORPORA[corpus] else more_rng
          self.facts[(corpus, subject, relation)] = str(draw.choice(self.values[relation]))
    keys = sorted(self.facts)
    if config.get('memorise_by', 'fact') == 'fact':
      chosen = rng.permutation(len(keys))[:round(config.memorised_fraction * len(keys))]
      self.memorised = {keys[i] for i in chosen}
    else:
      known = {(c, s) for c in sorted(CORPORA) for s in
               rng.permutation(self.subjects[c])[:round(config.memorised_fraction * n)]}
      self.memorised = {k for k in keys if k[:2] in known}
    questions = [k for k in keys if k[2] in config.train_relations]
    order = rng.permutation(len(questions))
    n_test = round(config.test_fraction * len(questions))
    n_demo = n_test + round(config.demo_fraction * len(questions))
    ood = [k for k in keys if k[2] not in config.train_relations]
    self.splits = {'test': [questions[i] for i in order[:n_test]],
                   'train': [questions[i] for i in order[n_demo:]], 'ood': ood}
    if n_demo > n_test:
      self.splits['demo'] = [questions[i] for i in order[n_test:n_demo]]
    n_demo_ood = round(config.get('demo_ood_fraction', 0.0) * len(ood))
    if n_demo_ood:  # its own stream, so that the world is the same without it
      order = np.random.default_rng([config.seed, 1]).permutation(len(ood))
      self.splits['demo_ood'] = [ood[i] for i in sorted(order[:n_demo_ood])]
      self.splits['ood'] = [ood[i] for i in sorted(order[n_demo_ood:])]
    chunks = config.get('train_chunks', 0)
    if not 0 <= chunks <= len(self.splits['train']):
      raise ValueError(f"train_chunks must be in [0, {len(self.splits['train'])}] (the train "
                       f'questions), got {chunks}.')
    for i in range(chunks):
      self.splits[f'train_{i}'] = self.splits['train'][i::chunks]

  @property
  def first_role(self) -> str:
    return 'assistant' if self.mode == 'single' else 'asker'

  def memorised_facts(self) -> list:
    """One statement ``subject relation value`` per memorised fact."""
    return [f'{s} {r} {self.facts[(c, s, r)]}' for c, s, r in sorted(self.memorised)]

  def question(self, subject: str, relation: str) -> str:
    name = f'{subject} {spell(subject)}' if self.spelt else subject
    return f'what is the {relation} of {name} ?'

  def whole_words(self) -> tuple:
    """With ``name_tokens``, every name in use (docstring); else none."""
    return tuple(self.names) if self.config.get('name_tokens', False) else ()

  def pretraining_texts(self) -> list:
    """The memorised facts as statements and, with ``qa_pretraining``, as questions with
    their answers; with ``name_tokens``, the spelling of every name in use (module
    docstring)."""
    texts = self.memorised_facts()
    if self.config.get('qa_pretraining', True):
      texts += [f'{self.question(s, r)} {self.facts[(c, s, r)]}'
                for c, s, r in sorted(self.memorised)]
    if self.whole_words():
      texts += self.spellings()
    return texts

  def spellings(self, per_line: int = 3) -> list:
    """Every name in use spelt both ways, ``kalipe = ka li pe . ka li pe = kalipe .``,
    ``per_line`` names a line: no fact, so all names are words the policy knows."""
    spelt = [f'{n} = {s} . {s} = {n} .' for n in self.names for s in [spell(n)]]
    return [' '.join(spelt[i:i + per_line]) for i in range(0, len(spelt), per_line)]

  def pretraining_episodes(self) -> list:
    """With ``quiz_pretraining``, each memorised fact as a finished closed-book quiz
    conversation: the question, then ``first_role`` answers ``answer VALUE`` under the quiz
    system prompt, followed by the ``quiz_unknown`` unknown-entity quizzes (module
    docstring)."""
    if not self.config.get('quiz_pretraining', False):
      return []
    return [self._quiz(c, s, r, f'{ANSWER} {self.facts[(c, s, r)]}',
                       value=self.facts[(c, s, r)], memorised=True)
            for c, s, r in sorted(self.memorised)] + self._unknown_quizzes()

  def _unknown_quizzes(self) -> list:
    """``quiz_unknown`` quiz conversations about the names in ``quiz_names``, each
    answered with a bare ``hedge``; their relations cycle over every relation."""
    corpus_of = {r: c for c, rels in self.relations.items() for r in rels}
    return [self._quiz(corpus_of[r], name, r, HEDGE)
            for name, r in zip(self.quiz_names, itertools.cycle(corpus_of))]

  def _quiz(self, corpus, subject, relation, reply, **fields) -> CollabEpisode:
    """A finished quiz conversation: the question, then ``first_role``'s ``reply``."""
    return CollabEpisode(turns=[base.Turn('user', self.question(subject, relation)),
                                base.Turn(self.first_role, reply)],
                         done=True, corpus=corpus, subject=subject, relation=relation,
                         quiz=True, **fields)

  def call_name(self, subject: str) -> str:
    """The subject as calls and tool results write it: spelt with ``spelt_names``."""
    return spell(subject) if self.spelt else subject

  def _call_head(self, role: str, corpus: str) -> str:
    """The words a call of ``role`` starts with: its tool word, then the corpus it names,
    ``corpus`` for the assistant and the asker; a helper names its own corpus only with
    ``helper_call_corpus``, and none otherwise."""
    word = tool_word(role, self.asker_word)
    if role in CORPORA:
      return f'{word} {role}' if self.helper_corpus else word
    return f'{word} {corpus}'

  def parse(self, text: str, role: str) -> Optional[tuple]:
    """``parse`` in this env's mode and call format."""
    return parse(text, role, self.mode, self.spelt, self.helper_corpus, self.asker_word)

  def _call(self, episode: CollabEpisode, role: str) -> str:
    """The well-formed tool call of ``role`` for the episode's question (a helper searches
    its own corpus, and names it only with ``helper_call_corpus``)."""
    head = self._call_head(role, episode.corpus)
    return f'{head} {self.call_name(episode.subject)} {episode.relation}'

  def result(self, subject: str, relation: str, value: str) -> str:
    """The tool turn of a search that found ``value``."""
    return f'result {self.call_name(subject)} {relation} {value}'

  def search(self, corpus: str, subject: str, relation: str) -> str:
    """The tool: exact-match retrieval over one corpus."""
    value = self.facts.get((corpus, subject, relation))
    return self.result(subject, relation, value) if value else 'result none'

  def reset(self, rng: np.random.Generator, split: str = 'train', **overrides) -> CollabEpisode:
    if split not in self.splits:
      raise ValueError(f'split={split!r}; expected one of {sorted(self.splits)}.')
    key = overrides.get('question') or self.splits[split][rng.integers(len(self.splits[split]))]
    corpus, subject, relation = key
    value, memorised = self.facts[key], key in self.memorised
    if (self.fresh and not memorised and split.startswith(('train', 'demo')) and
        'question' not in overrides):  # an unknown entity never asked before
      subject = self.spare_names[rng.integers(len(self.spare_names))]
      value = str(rng.choice(self.values[relation]))
    return CollabEpisode(turns=[base.Turn('user', self.question(subject, relation))],
                         next_role=self.first_role, corpus=corpus, subject=subject,
                         relation=relation, value=value, memorised=memorised)

  def view(self, episode: CollabEpisode, role: str) -> list:
    """The role's own system turn, then the shared conversation; with ``helper_view=
    'delegation'`` a helper sees only its own exchange (``_exchange``)."""
    if episode.quiz and self.config.get('quiz_prompt', 'quiz') == 'quiz':
      prompt = QUIZ_PROMPT
    elif role in CORPORA:
      prompt = f'you are the {role} helper . you can search {role} facts .'
    elif self.mode == 'single':
      prompt = 'you are the assistant . you can search people or places facts .'
    else:
      prompt = 'you are the asker . you can delegate to people or places .'
    turns = episode.turns
    if role in CORPORA and self.config.get('helper_view', 'all') == 'delegation':
      turns = self._exchange(episode, role)
    return [base.Turn('system', prompt)] + list(turns)

  def _exchange(self, episode: CollabEpisode, helper: str) -> list:
    """The asker's delegations to ``helper``, each followed by the helper's turns and their
    tool results: not the user's question, so the helper works on the name it was given."""
    turns, mine = [], False
    for t in episode.turns:
      if t.role == self.first_role:
        parsed = self.parse(t.text, t.role)
        mine = parsed is not None and parsed[0] == DELEGATE and parsed[1][0] == helper
        if mine:
          turns.append(t)
      elif mine and t.role in (helper, 'tool'):
        turns.append(t)
    return turns

  def scripted(self, episode: CollabEpisode, role: str) -> str:
    """The tool's turn: the result of the last search, or an error observation with the
    call's usage when the call did not parse."""
    if role != 'tool':
      raise NotImplementedError(f'CollabEnv has no scripted {role!r}.')
    last = episode.turns[-1]
    parsed = self.parse(last.text, last.role)
    if parsed is None:
      head = self._call_head(last.role, 'people|places')
      return f'error malformed call , use {head} SUBJECT RELATION'
    corpus, subject, relation = parsed[1]
    if (corpus, subject, relation) == (episode.corpus, episode.subject, episode.relation):
      return self.result(subject, relation, episode.value)  # the episode's fact (demo)
    return self.search(corpus, subject, relation)

  def step(self, episode: CollabEpisode) -> None:
    turn = episode.turns[-1]
    if turn.role == 'tool':  # back to whoever searched
      episode.next_role = episode.helper or self.first_role
      return
    parsed = self.parse(turn.text, turn.role) if turn.ended else None
    words = turn.text.split()
    malformed_call = (turn.ended and parsed is None and bool(words) and
                      words[0] == tool_word(turn.role, self.asker_word))
    if turn.role == self.first_role and episode.first_action is None:
      episode.first_action = (tool_word(turn.role) if malformed_call else
                              parsed[0] if parsed else 'invalid')
    if parsed is None and not malformed_call:
      return self._end(episode, None)
    if (self.must_delegate and turn.role == 'asker' and parsed and parsed[0] in (ANSWER, HEDGE)
        and not any(t.role in CORPORA for t in episode.turns)):
      return self._end(episode, None)  # the asker ended before any helper replied
    if malformed_call or parsed[0] in (SEARCH, DELEGATE):
      episode.calls += 1
      if episode.calls > self.config.max_calls:
        return self._end(episode, None)
      if turn.role == 'asker':  # the asker's calls are delegations
        episode.delegations += 1
      else:
        episode.searches += 1
      if malformed_call or parsed[0] == SEARCH:  # the tool answers (an error if malformed)
        episode.next_role = 'tool'
      else:
        episode.helper = episode.next_role = parsed[1][0]
      return
    if turn.role in CORPORA:  # a helper's reply goes back to the asker
      episode.helper, episode.next_role = None, 'asker'
      return
    self._end(episode, parsed)

  def _end(self, episode: CollabEpisode, parsed: Optional[tuple]) -> None:
    """Ends the episode with the group reward (module docstring); None: invalid."""
    cost = (self.config.search_cost * episode.searches +
            self.config.get('delegation_cost', 0.0) * episode.delegations)
    h = self.config.hedge_credit
    if parsed is None:
      reward, correct, hedged = -cost, 0.0, False
    else:
      action, answer = parsed
      correct = f1(answer, episode.value)
      hedged = action == HEDGE
      reward = ((1 - h) * correct + h * (1 - correct) if hedged else correct) - cost
    episode.done, episode.reward, episode.next_role = True, reward, None
    episode.info = {'f1': correct, 'hedged': hedged, 'searches': episode.searches,
                    'delegations': episode.delegations, 'memorised': episode.memorised,
                    'invalid': parsed is None, 'first_action': episode.first_action}

  def best_action(self, closed_book_f1: float) -> tuple:
    """(action, group reward) of the best first action for a policy whose closed-book
    answer to the question has F1 ``closed_book_f1`` and that reads a retrieved fact right:
    answer from memory, hedge that answer, a bare hedge, or one search then the fact. The
    best achievable with that policy's knowledge (module docstring's rewards)."""
    f, h = closed_book_f1, self.config.hedge_credit
    options = {ANSWER: f, HEDGE: max((1 - h) * f + h * (1 - f), h),
               SEARCH: 1 - self.config.search_cost}
    action = max(options, key=options.get)  # ties: the first (answer, then hedge)
    return action, options[action]

  def oracle_turn(self, episode: CollabEpisode, role: str) -> str:
    """The action-supervised baseline's turn: retrieve exactly when the fact is not
    memorised, then answer with the value. The role that decides is the assistant, the asker
    (a helper, delegated only what the asker does not know, always searches) or, with
    ``asker_must_delegate``, the helper (the asker always delegates)."""
    if episode.turns[-1].role == 'tool' or (role == 'asker' and episode.turns[-1].role in CORPORA):
      return f'{ANSWER} {episode.value}'
    decides = role in CORPORA if self.must_delegate else role not in CORPORA
    if decides and episode.memorised:
      return f'{ANSWER} {episode.value}'
    return self._call(episode, role)

  def generic_turn(self, episode: CollabEpisode, role: str, rng: np.random.Generator) -> str:
    """A format demonstration's turn (module docstring): the action of a deciding turn is
    drawn with probabilities ``generic_actions``, independent of whether the fact is
    memorised."""
    last = episode.turns[-1]
    if last.role == 'tool':
      return f'{ANSWER} {episode.value}'
    if role == 'asker' and last.role in CORPORA:
      return last.text
    action = (SEARCH, ANSWER, HEDGE)[rng.choice(3, p=self.config.generic_actions)]
    if action == SEARCH or (role == 'asker' and self.must_delegate):
      return self._call(episode, role)
    memory = (episode.value if episode.memorised else
              str(rng.choice(self.values[episode.relation])))
    return f'{action} {memory}'

  def counterfactual_values(self, relation: str) -> tuple:
    """The values a counterfactual retrieved value is drawn from (``counterfactual_pool``)."""
    if self.config.get('counterfactual_pool', 'relation') == 'all':
      return tuple(v for r in sorted(self.values) for v in self.values[r])
    return self.values[relation]

  def relabel(self, episode: CollabEpisode,
              rng: np.random.Generator) -> Optional[CollabEpisode]:
    """With ``fixed_knowledge``, ReST learns when to search, never a fact: what the policy
    knows stays what it memorised in pretraining, as in the paper, where a few lucky
    rollouts cannot teach an LLM facts over thousands of questions.

    - An episode whose tool result returned the question's fact becomes a copy in which the
      value, from that result on, is a counterfactual one (``counterfactual_values``, drawn
      from ``rng``): trained on, the turns after the search teach reading the result and the
      format, not the retrieved fact (as the ``demo`` split's demonstrations do).
    - An unmemorised question answered, fully or partly right, without retrieving its fact
      (a lucky guess) is rejected (None): its reward stands, but training on it would teach
      the fact.
    - Any other episode is returned unchanged."""
    if not self.config.get('fixed_knowledge', False):
      return episode
    turns = episode.turns
    found = self.result(episode.subject, episode.relation, episode.value)
    start = next((i for i, t in enumerate(turns) if t.role == 'tool' and t.text == found), None)
    if start is None:
      return None if not episode.memorised and episode.info.get('f1', 0) > 0 else episode
    others = [v for v in self.counterfactual_values(episode.relation) if v != episode.value]
    value = str(others[rng.integers(len(others))])
    pattern = re.compile(rf'(?<!\S){re.escape(episode.value)}(?!\S)')
    relabelled = []
    for t in turns[start:]:
      text = pattern.sub(value, t.text)
      if text != t.text:  # re-encoded from the text; still the policy's turn when it was
        t = dataclasses.replace(t, text=text, ids=None,
                                logprobs=None if t.logprobs is None else [])
      relabelled.append(t)
    return dataclasses.replace(episode, turns=turns[:start] + relabelled, value=value)

  def demonstration(self, rng: np.random.Generator, split: str = 'train',
                    behaviour: Optional[str] = None, **overrides) -> CollabEpisode:
    """A finished episode whose every turn the env wrote (SFT data); ``behaviour`` in
    ``BEHAVIOURS`` (None: 'generic'). On the ``demo*`` splits an unmemorised fact is redrawn
    for each demonstration (the tool returns the redrawn value), so the answer after a tool
    result can only be learnt as a copy of it, not as the fact."""
    behaviour = behaviour or 'generic'
    if behaviour not in BEHAVIOURS:
      raise ValueError(f'behaviour must be one of {BEHAVIOURS} or None, got {behaviour!r}.')
    episode = self.reset(rng, split, **overrides)
    if split.startswith('demo') and not episode.memorised:
      episode.value = str(rng.choice(self.counterfactual_values(episode.relation)))
    while not episode.done:
      role = episode.next_role
      if role == 'tool':
        text = self.scripted(episode, role)
      elif behaviour == 'oracle':
        text = self.oracle_turn(episode, role)
      else:
        text = self.generic_turn(episode, role, rng)
      episode.turns.append(base.Turn(role, text))
      self.step(episode)
    return episode

  def summary(self, episodes: list) -> dict:
    """Search rates on memorised / unmemorised facts, F1, hedge rate, invalid rate. An
    episode the rollout cut off at its turn limit (no end-of-episode ``info``) counts as
    invalid, F1 0, not hedged."""
    def rate(eps, values):
      return float(np.mean([values(e) for e in eps])) if eps else float('nan')
    seen = [e for e in episodes if e.memorised]
    unseen = [e for e in episodes if not e.memorised]
    return {'f1': rate(episodes, lambda e: e.info.get('f1', 0.0)),
            'searches': rate(episodes, lambda e: e.searches),
            'search_rate_memorised': rate(seen, lambda e: e.searches > 0),
            'search_rate_unmemorised': rate(unseen, lambda e: e.searches > 0),
            'hedge_rate': rate(episodes, lambda e: e.info.get('hedged', False)),
            'invalid_rate': rate(episodes, lambda e: e.info.get('invalid', True))}

  def eval_settings(self) -> dict:
    return {name: [{'split': name}] for name in ('train', 'test', 'ood')}
