"""Read and write the source notebooks as plain text, for editing them in a text editor.

The notebooks in ``nbs/`` stay the source of truth; this only converts between an
``.ipynb`` and a "percent" text form, one cell per ``# %%`` header:

    # %% [markdown]
    # Some *markdown* (each line commented with "# ", as jupytext does).
    # %%
    #| export
    def f(): ...
    # %% tags=["parameters"]
    x = 1

Usage::

    python tools/nbtext.py show nbs/01_hdf5.ipynb > /tmp/01_hdf5.py   # notebook -> text
    python tools/nbtext.py write /tmp/01_hdf5.py nbs/01_hdf5.ipynb    # text -> notebook

``write`` produces a clean notebook (no outputs, no execution counts), ready for
``nbdev_clean`` and ``nbdev_export``.
"""
import json
import re
import sys

HEADER = re.compile(r'^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$')


def notebook_to_text(path):
    nb = json.load(open(path, encoding='utf-8'))
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source'])
        head = '# %%'
        if cell['cell_type'] == 'markdown':
            head += ' [markdown]'
            src = '\n'.join(('# ' + l) if l else '#' for l in src.split('\n'))
        tags = cell.get('metadata', {}).get('tags')
        if tags:
            head += ' tags=' + json.dumps(tags)
        parts.append(head + '\n' + src.rstrip('\n') + '\n')
    return ''.join(parts)


def text_to_notebook(text):
    cells, cur = [], None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            cur = {'md': bool(m.group('md')), 'tags': json.loads(m.group('tags')) if m.group('tags') else None,
                   'lines': []}
            cells.append(cur)
        elif cur is None:
            if line.strip():
                raise SystemExit('text must start with a "# %%" cell header')
        else:
            cur['lines'].append(line)
    out = []
    for c in cells:
        while c['lines'] and not c['lines'][-1].strip():
            c['lines'].pop()
        src = '\n'.join(c['lines'])
        source = [l + '\n' for l in src.split('\n')]
        if source:
            source[-1] = source[-1].rstrip('\n')
        meta = {'tags': c['tags']} if c['tags'] else {}
        if c['md']:
            source = [_uncomment(l) for l in source]
            out.append({'cell_type': 'markdown', 'metadata': meta, 'source': source})
        else:
            out.append({'cell_type': 'code', 'execution_count': None, 'metadata': meta,
                        'outputs': [], 'source': source})
    return {'cells': out,
            'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
            'nbformat': 4, 'nbformat_minor': 4}


def _uncomment(line):
    "Markdown lines are commented in the text form: '# text' -> 'text', '#' -> ''."
    nl = '\n' if line.endswith('\n') else ''
    body = line[:-1] if nl else line
    if body.startswith('# '): return body[2:] + nl
    if body == '#': return nl
    return line


def main(argv):
    if len(argv) == 2 and argv[0] == 'show':
        sys.stdout.write(notebook_to_text(argv[1]))
    elif len(argv) == 3 and argv[0] == 'write':
        nb = text_to_notebook(open(argv[1], encoding='utf-8').read())
        with open(argv[2], 'w', encoding='utf-8') as f:
            json.dump(nb, f, indent=1, ensure_ascii=False)
            f.write('\n')
    else:
        raise SystemExit(__doc__)


if __name__ == '__main__':
    main(sys.argv[1:])
